"""The promotion gate against a real MLflow SQLite registry: it moves @champion only when it should,
and every decision is written on the version."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from mobile_vla import tracking
from mobile_vla.cli import main
from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.sim.success import wilson_interval
from mobile_vla.tracking.lifecycle import GateConfig, evaluate_gate, load_gate, promote

MODEL = "gate-test"


def register_version(tmp_path: Path, marker: str, metrics: dict[str, float] | None) -> str:
    model_dir = tmp_path / f"model-{marker}"
    (model_dir / "policy").mkdir(parents=True)
    (model_dir / "policy" / "config.json").write_text(json.dumps({"marker": marker}))
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("gate-test")) as run:
        pass
    version = tracking.register_policy(model_dir, run.info.run_id, name=MODEL, alias="challenger")
    if metrics:
        tracking.log_version_metrics(MODEL, version, metrics)
    return version


def eval_metrics(success: float, episodes: int = 200, mae: float = 0.10, collisions: float = 0.05) -> dict:
    return {
        "closed_loop.success_rate": success,
        "closed_loop.episodes": episodes,
        "offline.mae": mae,
        "closed_loop.collision_rate": collisions,
    }


def test_wilson_interval_matches_reference_values():
    low, high = wilson_interval(81, 100)  # textbook example: 0.7222 .. 0.8749
    assert low == pytest.approx(0.7222, abs=1e-3) and high == pytest.approx(0.8749, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and 0.0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] > 0.65


def test_gate_passes_first_challenger_then_moves_champion_and_tags_both(platform_home, tmp_path):
    gate = GateConfig(min_episodes=100, min_success_rate=0.5)
    v1 = register_version(tmp_path, "a", eval_metrics(0.60))
    first = promote(MODEL, from_alias="challenger", gate=gate)
    assert first.decision == "promoted" and first.compared_to is None
    assert tracking.get_version_by_alias(MODEL, "champion") == v1

    v2 = register_version(tmp_path, "b", eval_metrics(0.80, mae=0.09))  # Wilson low ~0.74 >= 0.60
    second = promote(MODEL, from_alias="challenger", gate=gate)
    assert second.promoted and second.version == v2
    assert tracking.get_version_by_alias(MODEL, "champion") == v2
    assert tracking.get_version_by_alias(MODEL, "previous-champion") == v1
    tags = tracking.get_version_tags(MODEL, v2)
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.compared_to"] == v1
    assert tags["promotion.reason"].startswith("passed")
    assert "T" in tags["promotion.time"] and tags["promotion.time"].endswith("+00:00")
    assert {c["name"] for c in json.loads(tags["promotion.checks"])} >= {"episodes", "success_superior", "offline_mae"}
    assert tracking.get_version_tags(MODEL, v1)["promotion.superseded_by"] == v2


def test_gate_fails_keeps_champion_and_tags_say_why(platform_home, tmp_path):
    gate = GateConfig(min_episodes=100)
    v1 = register_version(tmp_path, "a", eval_metrics(0.70))
    promote(MODEL, version=v1, gate=gate)
    # Better on its point estimate, but within noise of the champion: the superior rule refuses.
    v2 = register_version(tmp_path, "b", eval_metrics(0.73))
    decision = promote(MODEL, from_alias="challenger", gate=gate)
    assert decision.decision == "rejected"
    assert tracking.get_version_by_alias(MODEL, "champion") == v1
    tags = tracking.get_version_tags(MODEL, v2)
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.compared_to"] == v1
    assert "success_superior" in tags["promotion.reason"] and "Wilson low" in tags["promotion.reason"]

    # The same numbers pass a point-estimate gate; an offline MAE regression still blocks it.
    v3 = register_version(tmp_path, "c", eval_metrics(0.75, mae=0.2))
    regressed = promote(MODEL, version=v3, gate=gate.model_copy(update={"success_rule": "point"}))
    assert regressed.decision == "rejected" and "offline_mae" in regressed.reason
    assert tracking.get_version_by_alias(MODEL, "champion") == v1


def test_missing_metric_is_named_and_refused_unless_forced(platform_home, tmp_path):
    v1 = register_version(tmp_path, "a", eval_metrics(0.70))
    promote(MODEL, version=v1, gate=GateConfig(min_episodes=100))
    v2 = register_version(tmp_path, "b", {"offline.mae": 0.05})  # never evaluated closed-loop
    decision = promote(MODEL, version=v2, gate=GateConfig(min_episodes=100))
    assert decision.decision == "rejected"
    assert f"version {v2}: metric.closed_loop.success_rate" in decision.reason
    assert tracking.get_version_by_alias(MODEL, "champion") == v1

    forced = promote(MODEL, version=v2, gate=GateConfig(min_episodes=100), force=True)
    assert forced.decision == "forced" and forced.reason.startswith("forced by operator")
    assert tracking.get_version_by_alias(MODEL, "champion") == v2
    assert tracking.get_version_tags(MODEL, v2)["promotion.decision"] == "forced"


def test_too_few_episodes_fail_even_with_a_perfect_score():
    result = evaluate_gate(GateConfig(min_episodes=200), eval_metrics(1.0, episodes=20), None)
    assert not result.passed
    assert [c.name for c in result.checks if not c.passed] == ["episodes"]


def test_bad_gate_input_names_field_and_value(tmp_path, platform_home):
    bad = tmp_path / "gate.yaml"
    bad.write_text("min_episodes: 0\nsuccess_rule: lucky\n")
    with pytest.raises(ConfigError) as err:
        load_gate(bad)
    assert "min_episodes = 0" in str(err.value) and "success_rule = 'lucky'" in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'min_sucess_rate'"):
        load_gate(None, ["min_sucess_rate=0.3"])
    with pytest.raises(ModelError, match="has no alias 'challenger'"):
        promote("no-such-model", from_alias="challenger")


def test_promote_cli_exit_codes_and_shipped_gate_file(platform_home, tmp_path, capsys):
    gate_file = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "gate.yaml"
    assert load_gate(gate_file).success_rule == "superior"
    v1 = register_version(tmp_path, "a", eval_metrics(0.4))
    # Below the shipped file's success floor (0.5): rejected, exit 1, nothing moves.
    assert main(["promote", "--model", MODEL, "--gate", str(gate_file)]) == 1
    assert tracking.get_version_by_alias(MODEL, "champion") is None
    assert main(["promote", "--model", MODEL, "--gate", str(gate_file), "min_success_rate=0.3"]) == 0
    assert tracking.get_version_by_alias(MODEL, "champion") == v1
    assert main(["promote", "--model", MODEL, "--gate", "nope.yaml"]) == 2
    assert "gate file not found" in capsys.readouterr().err
