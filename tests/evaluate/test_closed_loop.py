"""Closed-loop evaluation on real MiniWorld scenes in Ray tasks: the expert and a random-weight tiny
policy on the same seeds, lockstep batching equal to one episode per task, results on the version."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow import MlflowClient

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.evaluate.closed_loop import evaluate_closed_loop, evaluate_model_version
from mobile_vla.sim.scenes import scene_from_seed
from mobile_vla.sim.split_spec import default_split_spec
from mobile_vla.tracking import get_version_metrics, get_version_tags

SEEDS = 2  # val seeds 1_000_000.. (the expert solves these in 31 and 51 steps; a random policy does not)
MAX_STEPS = 60

pytestmark = pytest.mark.slow  # MiniWorld episodes in Ray tasks, each run twice (model and expert)


def check_summary(summary, episodes: int) -> None:
    assert summary.episodes == episodes
    for rate in (summary.success_rate, summary.wrong_target_rate, summary.timeout_rate, summary.collision_rate):
        assert 0.0 <= rate <= 1.0
    assert summary.success_rate + summary.wrong_target_rate + summary.timeout_rate == pytest.approx(1.0)
    assert summary.success_low <= summary.success_rate <= summary.success_high
    assert 0.0 <= summary.spl <= 1.0
    assert summary.spl * summary.spl_episodes <= summary.successes + 1e-9  # only successes score, each <= 1
    assert summary.collisions_per_episode >= 0


@pytest.fixture(scope="module")
def model_report(ray_cluster, tiny_model_dir):
    return evaluate_closed_loop(
        str(tiny_model_dir), "val", SEEDS, episodes_per_task=SEEDS, record_frames=1, max_steps=MAX_STEPS, progress=False
    )


def test_random_policy_next_to_expert_on_same_seeds(model_report):
    report = model_report
    assert report.seeds == [1_000_000 + i for i in range(SEEDS)]
    assert [e["seed"] for e in report.episodes] == report.seeds
    check_summary(report.policy, SEEDS)
    check_summary(report.expert, SEEDS)
    assert report.expert.success_rate == 1.0  # the teacher solves these scenes
    assert report.expert.spl == pytest.approx(1.0)  # its own path is the reference
    assert report.policy.success_rate < report.expert.success_rate  # random weights do not
    assert report.settings["policy"] == "model"

    spec = default_split_spec()
    for episode in report.episodes:
        scene = scene_from_seed("val", episode["seed"], spec).model_copy(update={"max_steps": MAX_STEPS})
        assert episode["instruction"] == scene.instruction
        for run in (episode, episode["expert"]):
            path = np.asarray(run["trajectory"])  # [steps + 1, 2]
            assert path.shape == (run["steps"] + 1, 2)
            assert path[0] == pytest.approx([scene.agent.x, scene.agent.z], abs=1e-5)
            assert run["path_length"] == pytest.approx(np.linalg.norm(np.diff(path, axis=0), axis=1).sum(), rel=1e-4)
            assert run["steps"] <= scene.max_steps
            if run["outcome"] == "timeout":
                assert run["steps"] == scene.max_steps
        assert 0.0 <= episode["mean_confidence"] <= 1.0  # the model's confidence
        assert math.isnan(episode["expert"]["mean_confidence"])  # the expert has none

    frames = report.frames[report.seeds[0]]  # record_frames=1: the first seed's camera, start included
    assert set(report.frames) == {report.seeds[0]}
    assert frames.dtype == np.uint8 and frames.shape == (report.episodes[0]["steps"] + 1, 224, 224, 3)

    metrics = report.metrics()
    assert metrics["closed_loop.val.episodes"] == SEEDS
    assert metrics["closed_loop.success_rate"] == metrics["closed_loop.val.success_rate"]
    assert metrics["closed_loop.val.expert_success_rate"] == report.expert.success_rate
    assert metrics["closed_loop.val.spl"] == report.policy.spl
    assert "closed_loop.val.success_rate" in report.metrics(primary=False)
    assert "closed_loop.success_rate" not in report.metrics(primary=False)


def test_lockstep_batch_equals_one_episode_per_task(ray_cluster):
    """Several episodes share one MiniWorld env per task (worlds swapped in and out): every frame and
    path must be exactly what the episode gives alone."""
    batched = evaluate_closed_loop(
        "expert", "unseen_layout", 2, episodes_per_task=2, record_frames=2, max_steps=30, progress=False
    )
    alone = evaluate_closed_loop(
        "expert", "unseen_layout", 2, episodes_per_task=1, record_frames=2, max_steps=30, progress=False
    )
    assert batched.seeds == alone.seeds == [2_000_000, 2_000_001]
    for a, b in zip(batched.episodes, alone.episodes, strict=True):
        assert (a["outcome"], a["steps"], a["collisions"]) == (b["outcome"], b["steps"], b["collisions"])
        np.testing.assert_array_equal(a["trajectory"], b["trajectory"])
    for seed in batched.seeds:
        np.testing.assert_array_equal(batched.frames[seed], alone.frames[seed])
    first, second = (batched.frames[s] for s in batched.seeds)
    assert not np.array_equal(first[0], second[0])  # different rooms really were drawn


def test_bad_requests_fail_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="'nope'.*not in the split spec"):
        evaluate_closed_loop("expert", "nope", 2)
    with pytest.raises(ConfigError, match="has only 100000 seeds"):
        evaluate_closed_loop("expert", "val", 10, seed_offset=99_995)
    with pytest.raises(ConfigError, match="--episodes 0"):
        evaluate_closed_loop("expert", "val", 0)
    with pytest.raises(ModelError, match="no such folder"):
        evaluate_closed_loop(str(tmp_path / "missing"), "val", 1)
    with pytest.raises(ConfigError, match="token"):
        evaluate_closed_loop(None, "val", 1, endpoint="http://127.0.0.1:9")


def test_results_logged_on_the_model_version(ray_cluster, registered_model, tmp_path):
    """What the online update and the promotion gate call: metrics and files land on the version."""
    name, version = registered_model
    returned = evaluate_model_version(name, version, split="unseen_pair", episodes=2, max_steps=6)
    stored = get_version_metrics(name, version)
    assert stored["closed_loop.episodes"] == 2
    assert stored["closed_loop.unseen_pair.episodes"] == 2
    assert stored["closed_loop.success_rate"] == pytest.approx(returned["closed_loop.success_rate"], abs=1e-6)
    assert 0.0 <= stored["closed_loop.unseen_pair.expert_success_rate"] <= 1.0
    assert get_version_tags(name, version)["evaluation.closed_loop.split"] == "unseen_pair"

    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "evaluation/unseen_pair")}
    assert {"closed_loop.json", "trajectories.png", "confidence.png"} <= files
    assert any(f.startswith("episode_3000000_") and f.endswith(".gif") for f in files)
    history = client.get_metric_history(run_id, "closed_loop.unseen_pair.success_rate")
    assert len(history) == 1
