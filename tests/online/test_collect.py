"""`mobile-vla collect` in-process on real MiniWorld scenes in Ray tasks, a real tiny policy and the real
feedback store: every visited step lands as a valid operator correction, beta = 1 is the expert
driving, beta = 0 the policy, and a seeded round is reproducible whatever the task batching."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate.rollout import PolicySpec, RolloutConfig, rollout_seeds
from mobile_vla.evaluate.tasks import fan_out
from mobile_vla.online.collect import collect, dagger_scene_seeds
from mobile_vla.online.feedback_record import normalise_record
from mobile_vla.online.feedback_store import FeedbackStore
from mobile_vla.serve.schemas import FeedbackRequest
from mobile_vla.sim.split_spec import default_split_spec

pytestmark = pytest.mark.slow  # MiniWorld episodes in Ray tasks, four rounds

EPISODES = 3
MAX_STEPS = 12


def stored(root) -> dict[str, list[dict]]:
    """Episode id -> its records' meta (image bytes under "jpeg"), in step order."""
    episodes: dict[str, list[dict]] = {}
    for record in FeedbackStore(root).replay():
        episodes.setdefault(record.meta["episode_id"], []).append({**record.meta, "jpeg": record.image})
    return {k: sorted(v, key=lambda m: m["step"]) for k, v in episodes.items()}


def run_round(model_dir, root, beta: float, seed: int, episodes_per_task: int, tag: str):
    return collect(
        str(model_dir),
        EPISODES,
        beta=beta,
        feedback_dir=root,
        seed=seed,
        max_steps=MAX_STEPS,
        episodes_per_task=episodes_per_task,
        run_tag=tag,
        progress=False,
    )


@pytest.fixture(scope="module")
def model_dir(make_policy_dir, tmp_path_factory):
    return make_policy_dir(tmp_path_factory.mktemp("collect-model"))


@pytest.fixture(scope="module")
def mixed_rounds(ray_cluster, model_dir, tmp_path_factory):
    """The same seeded beta = 0.5 round three times: one task per episode, then twice all in one task."""
    roots = [tmp_path_factory.mktemp(f"feedback-{i}") for i in range(3)]
    reports = [
        run_round(model_dir, root, 0.5, seed=3, episodes_per_task=per_task, tag=tag)
        for root, per_task, tag in zip(roots, (1, EPISODES, EPISODES), "abc", strict=True)
    ]
    return reports, roots


def test_every_visited_step_is_a_valid_correction_in_the_store(mixed_rounds, tmp_path):
    report, root = mixed_rounds[0][0], mixed_rounds[1][0]
    seeds = dagger_scene_seeds(default_split_spec(), "train", EPISODES, 3)
    assert [e["seed"] for e in report.episodes] == seeds
    assert all(s >= 500_000 for s in seeds)  # the upper half of train: evaluation counts up from 0
    episodes = stored(root)
    assert sorted(episodes) == sorted(f"dagger-a-train-{s}" for s in seeds)
    assert sum(map(len, episodes.values())) == report.corrections == report.steps
    for row in report.episodes:
        steps = episodes[row["episode_id"]]
        assert [m["step"] for m in steps] == list(range(row["steps"]))
        assert row["learner_steps"] + row["expert_steps"] == row["steps"]
        assert sum(not m["intervention"] for m in steps) == row["learner_steps"]
        assert [m["episode_done"] for m in steps] == [False] * (row["steps"] - 1) + [True]
        assert steps[-1]["success"] == (row["outcome"] == "success")
        assert all(m["success"] is None for m in steps[:-1])
        assert steps[0]["state"] == [0.0, 0.0, 0.0]  # the state is the command executed before
        for before, after in zip(steps, steps[1:], strict=False):
            assert after["state"] == pytest.approx(before["action_executed"])
        for meta in steps:
            assert meta["action_corrected"] is not None  # the expert labelled every visited state
            if meta["intervention"]:
                assert meta["action_executed"] == meta["action_corrected"]
            # What the HTTP route would accept, and what the store's own check accepts.
            body = {k: meta[k] for k in FeedbackRequest.model_fields if k != "image"}
            FeedbackRequest.model_validate({**body, "image": base64.b64encode(meta["jpeg"]).decode()})
            normalise_record({**body, "image": meta["jpeg"]})
    assert 0 < report.learner_steps < report.steps  # beta = 0.5 mixed both
    assert "policy-controlled" in report.summary() and str(root) in report.summary()

    assembled = FeedbackStore(root).assemble_episodes(tmp_path / "dataset")
    assert len(assembled.episodes) == EPISODES and assembled.waiting == []
    assert assembled.summary.corrected_steps == report.steps


def without(meta: dict, *keys: str) -> dict:
    return {k: v for k, v in meta.items() if k not in {"robot_id", "episode_id", "received_at", *keys}}


def test_a_seeded_round_is_reproducible(mixed_rounds):
    """Same seed and batching: the same records, byte for byte. Another batching: the same beta draws,
    scenes and outcomes; the policy's commands only as close as batched float arithmetic allows."""
    reports, roots = mixed_rounds
    assert [without(e) for e in reports[1].episodes] == [without(e) for e in reports[2].episodes]
    assert [without(e) for e in reports[0].episodes] == [without(e) for e in reports[1].episodes]
    alone, batched, again = (stored(root) for root in roots)
    for key, steps in batched.items():
        assert [without(m) for m in steps] == [without(m) for m in again[key.replace("-b-", "-c-")]]
        one_per_task = alone[key.replace("-b-", "-a-")]
        assert [m["intervention"] for m in steps] == [m["intervention"] for m in one_per_task]
        for m, n in zip(steps, one_per_task, strict=True):
            assert m["action_executed"] == pytest.approx(n["action_executed"], abs=1e-4)
            assert m["action_corrected"] == pytest.approx(n["action_corrected"], abs=1e-4)


def test_beta_one_is_the_expert_driving_and_beta_zero_the_policy(ray_cluster, model_dir, tmp_path):
    expert_round = run_round(model_dir, tmp_path / "b1", 1.0, seed=5, episodes_per_task=EPISODES, tag="e")
    assert expert_round.learner_steps == 0
    for steps in stored(tmp_path / "b1").values():
        assert all(m["intervention"] and m["action_executed"] == m["action_corrected"] for m in steps)
    # The expert alone on the same scenes (evaluation's task body) goes exactly the same way.
    seeds = [e["seed"] for e in expert_round.episodes]
    spec_json = default_split_spec().model_dump_json()
    alone = fan_out(
        rollout_seeds,
        [[("train", s) for s in seeds]],
        (spec_json, PolicySpec.expert(), RolloutConfig(max_steps=MAX_STEPS)),
        "expert",
        progress=False,
    )
    alone = {r["seed"]: r for r in alone}
    for row in expert_round.episodes:
        assert (row["outcome"], row["steps"]) == (alone[row["seed"]]["outcome"], alone[row["seed"]]["steps"])

    policy_round = run_round(model_dir, tmp_path / "b0", 0.0, seed=5, episodes_per_task=EPISODES, tag="p")
    assert policy_round.learner_steps == policy_round.steps
    records = [m for steps in stored(tmp_path / "b0").values() for m in steps]
    assert not any(m["intervention"] for m in records)
    executed = np.array([m["action_executed"] for m in records])
    corrected = np.array([m["action_corrected"] for m in records])
    assert np.abs(executed - corrected).max(axis=1).mean() > 0.05  # a random policy is not the expert


def test_the_command_runs_a_round_and_prints_where_the_corrections_went(ray_cluster, model_dir, tmp_path, capsys):
    root = tmp_path / "feedback"
    argv = ["collect", "--in-process", "--episodes", "2", "--max-steps", "4", "--seed", "1", "--no-progress"]
    argv += ["--model", str(model_dir), "--feedback-dir", str(root)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "collect: 2 episodes of split train" in printed
    assert f"corrections written: 8 (every visited step, labelled by the expert) -> {root}" in printed
    assert sum(map(len, stored(root).values())) == 8


def test_bad_options_fail_before_any_work(model_dir, capsys):
    with pytest.raises(ConfigError, match="--beta 1.5"):
        collect(str(model_dir), 2, beta=1.5)
    with pytest.raises(ConfigError, match="'nope'.*not in the split spec"):
        collect(str(model_dir), 2, split="nope")
    with pytest.raises(ConfigError, match="leaves 50000 seeds"):
        collect(str(model_dir), 50_001, split="val")
    with pytest.raises(ConfigError, match="--model expert"):
        collect("expert", 2)
    with pytest.raises(ConfigError, match="--model MODEL_URI is required"):
        collect(None, 2)
    with pytest.raises(ConfigError, match="token"):
        collect(None, 2, endpoint="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match="--feedback-dir"):
        collect(None, 2, endpoint="http://127.0.0.1:9", token="x" * 20, feedback_dir="/tmp/x")
    assert main(["collect", "--model", str(model_dir), "--in-process", "--episodes", "0"]) == 2
    assert "--episodes 0: expected at least 1" in capsys.readouterr().err
    assert main(["collect", "--in-process", "--episodes", "2", "--token-file", "t"]) == 2
    assert "--token-file is for --endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of --endpoint / --in-process is required
        main(["collect", "--model", str(model_dir), "--episodes", "2"])
