"""Issue 15's temporal chunk ensembling in closed loop (evaluate/rollout.py ChunkEnsemblePolicy): the command
executed at step t is the exp(-m * age)-weighted mean of what each of the last K chunks planned for t; per
slot, reset by start(); its checks in RolloutConfig, evaluate_closed_loop and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate.rollout import BackendPolicy, ChunkEnsemblePolicy, RolloutConfig
from mobile_vla.policy.config import PREVIOUS_COMMAND
from mobile_vla.runtime.backends import load_backend

K = 4  # the stub's chunk length


class PlanningStub:
    """A BackendPolicy-shaped stub: the chunk it plans at step s for slot b predicts 100*b + 10*s + k for the
    step s + k (every axis), so which plan a blended command came from can be read off its value."""

    needs_frames = True
    state_input = PREVIOUS_COMMAND
    chunk = K

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}
        self.last_chunks = None

    def start(self, episodes) -> None:
        self.steps = dict.fromkeys(range(len(episodes)), 0)

    def act(self, slots, images, state, instructions, worlds):
        chunks = np.empty((len(slots), K, 3), np.float32)  # [B, K, 3]
        for j, slot in enumerate(slots):
            s = self.steps[slot]
            chunks[j] = (100 * slot + 10 * s + np.arange(K, dtype=np.float32))[:, None]
            self.steps[slot] = s + 1
        self.last_chunks = chunks
        return chunks[:, 0], np.full(len(slots), 0.5, np.float32)  # [B, 3], [B]


def drive(policy, steps: int, slots=(0,)) -> list[np.ndarray]:
    """The commands `policy` executes over `steps` steps of the given slots (two episodes started)."""
    policy.start([("a", "go to the red box"), ("b", "go to the blue ball")])
    executed = []
    for _ in range(steps):
        actions, confidence = policy.act(list(slots), None, None, None, None)
        assert actions.shape == (len(slots), 3) and confidence.shape == (len(slots),)
        executed.append(actions)
    return executed


def planned_for(slot: int, t: int) -> np.ndarray:
    """What the plans made at steps t, t-1, ..., t-K+1 (newest first) predicted for step t."""
    return np.array([100 * slot + 10 * (t - a) + a for a in range(min(t, K - 1) + 1)], np.float32)


def test_equal_weights_average_every_plan_for_this_step():
    executed = drive(ChunkEnsemblePolicy(PlanningStub(), decay=0.0), steps=7)
    for t, actions in enumerate(executed):
        np.testing.assert_allclose(actions[0], np.full(3, planned_for(0, t).mean()), rtol=1e-6)
    assert executed[0][0, 0] == 0.0 and executed[6][0, 0] == pytest.approx((60 + 51 + 42 + 33) / 4)


def test_decay_weights_older_plans_less_and_a_large_one_is_the_newest_first_action():
    decay = 0.7
    executed = drive(ChunkEnsemblePolicy(PlanningStub(), decay=decay), steps=6)
    for t, actions in enumerate(executed):
        predictions = planned_for(0, t)
        weights = np.exp(-decay * np.arange(len(predictions)))
        np.testing.assert_allclose(actions[0, 0], weights @ predictions / weights.sum(), rtol=1e-6)
    newest = drive(ChunkEnsemblePolicy(PlanningStub(), decay=1e3), steps=6)
    plain = drive(PlanningStub(), steps=6)
    np.testing.assert_allclose(np.stack(newest), np.stack(plain))


def test_slots_blend_their_own_plans_and_start_forgets_the_last_episode():
    policy = ChunkEnsemblePolicy(PlanningStub(), decay=0.0)
    executed = drive(policy, steps=5, slots=(0, 1))
    for t, actions in enumerate(executed):
        np.testing.assert_allclose(actions[:, 0], [planned_for(0, t).mean(), planned_for(1, t).mean()], rtol=1e-6)
    again = drive(policy, steps=1)  # start() again: a new episode, no plan of the old one blended in
    assert again[0][0, 0] == 0.0
    assert policy.state_input == PREVIOUS_COMMAND and policy.chunk == K  # the inner policy's attributes


def test_a_real_backend_keeps_its_chunks_and_a_large_decay_executes_the_first_action(tiny_model_dir):
    backend = load_backend(tiny_model_dir, prefer=("torch",), threads=1)
    rng = np.random.default_rng(0)
    instructions = ["go to the red box", "go to the blue ball"]
    frames = rng.integers(0, 256, (3, 2, 224, 224, 3), dtype=np.uint8)  # [T, B, H, W, 3]
    state = np.zeros((2, 3), np.float32)  # [B, S]
    plain, blended, newest = (
        BackendPolicy(backend),
        ChunkEnsemblePolicy(BackendPolicy(backend), 0.0),
        ChunkEnsemblePolicy(BackendPolicy(backend), 1e3),
    )
    runs = {}
    for name, policy in (("plain", plain), ("blended", blended), ("newest", newest)):
        policy.start([("a", instructions[0]), ("b", instructions[1])])
        runs[name] = [policy.act([0, 1], images, state, instructions, None)[0] for images in frames]
    assert plain.last_chunks.shape == (2, plain.chunk, 3)
    np.testing.assert_allclose(np.stack(runs["newest"]), np.stack(runs["plain"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs["blended"][0], runs["plain"][0], rtol=1e-5, atol=1e-6)  # one plan so far
    assert not np.allclose(runs["blended"][2], runs["plain"][2])  # three plans blended, the model's differ


@pytest.mark.parametrize("decay", [-0.1, True, "0.5", float("nan")])
def test_rollout_config_refuses_a_bad_decay(decay):
    with pytest.raises(ConfigError, match="--chunk-ensemble"):
        RolloutConfig(chunk_ensemble=decay)


def test_evaluate_refuses_chunk_ensembling_for_the_expert():
    from mobile_vla.evaluate.closed_loop import evaluate_closed_loop

    with pytest.raises(ConfigError, match="--chunk-ensemble blends the chunks of a model"):
        evaluate_closed_loop("expert", "val", 1, chunk_ensemble=0.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--chunk-ensemble", "0.5", "--no-log"], "--chunk-ensemble is for closed-loop evaluation"),
        (["--model", "expert", "--closed-loop", "--chunk-ensemble", "0", "--no-log"], "give --model MODEL_URI"),
        (["--model", "m", "--closed-loop", "--chunk-ensemble", "-1", "--no-log"], "--chunk-ensemble -1.0: expected"),
        (["--model", "m", "--closed-loop", "--chunk-ensemble", "0.5"], "add --no-log"),
    ],
)
@pytest.mark.unseeded_home  # the arguments fail before any MLflow store is opened
def test_chunk_ensemble_argument_errors(argv, message, capsys, platform_home):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
