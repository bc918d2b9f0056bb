"""The demo's DAgger sizes (no Ray): what the online update gets, the step plan, beta per round, errors."""

from __future__ import annotations

import pytest

from mobile_vla.demo.dagger import REPLAY_EVAL_WINDOWS, round_beta, update_config
from mobile_vla.demo.runner import STEPS, planned_steps
from mobile_vla.demo.settings import REGISTERED_MODEL, small, tiny
from mobile_vla.demo.training import DataOutcome
from mobile_vla.errors import ConfigError


def _data(folder) -> DataOutcome:
    return DataOutcome(
        folder=folder, episodes=8, frames=300, expert_kept=8, expert_attempted=8, control_hz=5.0, reused=False
    )


def test_the_update_gets_the_demo_sizes_feedback_store_and_replay_data(tmp_path):
    cfg = tiny(home=tmp_path / "home")
    update = update_config(cfg, _data(tmp_path / "data"))
    assert update.model == REGISTERED_MODEL
    assert update.feedback.root == str((tmp_path / "home" / "feedback").resolve()) == str(cfg.feedback_dir())
    assert update.feedback.min_new_episodes == cfg.dagger_episodes == 4
    assert update.replay.data == str(tmp_path / "data") and update.replay.eval_windows == REPLAY_EVAL_WINDOWS
    finetune = update.finetune
    assert (finetune.steps, finetune.batch_size, finetune.lr) == (30, 4, 3e-3)
    assert finetune.trainable == "policy_head" and finetune.augment is False and finetune.device == "cpu"
    # tiny's gate: only the shipped job's forgetting check on the replay data
    assert update.gate.require_improvement == {}
    assert update.gate.offline_mae_metric == "online.replay_mae" and update.gate.max_offline_mae_regression == 0.05
    assert not update.gate.require_closed_loop


def test_small_runs_one_round_of_sixteen_scenes_with_the_shipped_fine_tune_options(tmp_path):
    cfg = small(home=tmp_path)
    update = update_config(cfg, _data(tmp_path / "data"))
    assert cfg.dagger_rounds == 1 and cfg.dagger_episodes == 16 and cfg.dagger_max_steps is None
    assert (update.finetune.steps, update.finetune.batch_size, update.finetune.lr) == (100, 8, 1e-4)
    assert update.finetune.trainable == "all"
    # small keeps the shipped gate: 5% better on the corrected steps, no forgetting on the replay data
    assert update.gate.require_improvement == {"online.corrected_mae": 0.05}
    assert update.gate.offline_mae_metric == "online.replay_mae" and update.gate.max_offline_mae_regression == 0.05


def test_a_bad_update_override_names_the_field(tmp_path):
    cfg = tiny(home=tmp_path, update_overrides=["finetune.lr=fast"])
    with pytest.raises(ConfigError, match=r"finetune\.lr"):
        update_config(cfg, _data(tmp_path / "data"))


def test_each_round_adds_a_dagger_step_and_a_drive_and_halves_beta():
    assert planned_steps(tiny(dagger_rounds=0)) == list(STEPS)
    assert planned_steps(tiny(dagger_rounds=2))[len(STEPS) :] == ["dagger_1", "robots_1", "dagger_2", "robots_2"]
    cfg = tiny(dagger_beta=0.5)
    assert [round_beta(cfg, n) for n in (1, 2, 3)] == [0.5, 0.25, 0.125]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dagger_episodes", 1, "dagger_episodes = 1"),
        ("dagger_beta", 1.5, "dagger_beta = 1.5"),
        ("dagger_rounds", -1, "dagger_rounds = -1"),
        ("dagger_max_steps", 0, "dagger_max_steps = 0"),
        ("dagger_lr", 0, "dagger_lr = 0"),
    ],
)
def test_bad_dagger_sizes_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**{field: value})
