"""The model card: rendered from a fixture, and written to a real MLflow store's version description,
rewritten when the version is evaluated again and when the gate decides."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from mobile_vla import tracking
from mobile_vla.tracking.model_card import (
    MAX_CHARS,
    CardFacts,
    Interval,
    SplitRow,
    dataset_tags,
    render_model_card,
    split_rows,
)

MODEL = "card-test"


def card_facts(**changes) -> CardFacts:
    facts = CardFacts(
        name=MODEL,
        version="3",
        aliases=["challenger"],
        source="train",
        run_id="abcdef0123456789",
        experiment_id="7",
        training={"data": "`/data/nav` · train 1,530 episodes / 91,800 frames", "model": "preset small"},
        splits=[
            SplitRow(
                "unseen_pair",
                Interval(0.415, 0.35, 0.48, 200),
                expert=Interval(0.96, 0.92, 0.98, 200),
                champion=Interval(0.373, 0.31, 0.44, 200),
            ),
            SplitRow("val", Interval(0.6, 0.53, 0.66, 200)),
        ],
        primary_split="unseen_pair",
        champion_version="2",
        gate={
            "decision": "rejected",
            "compared_to": "2",
            "time": "2026-12-07T05:00:00+00:00",
            "reason": "failed: success_superior (challenger Wilson low 0.350 >= champion 0.373 + 0.000)",
            "checks": json.dumps([{"name": "success_superior", "passed": False, "detail": "0.350 >= 0.373"}]),
        },
        plots=[("trajectories, unseen_pair", "evaluation/unseen_pair/trajectories.png")],
        written="2026-12-07T05:01:00+00:00",
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_card_shows_training_success_against_expert_and_champion_gate_and_plots():
    card = render_model_card(card_facts())
    assert card.startswith("**card-test v3** · aliases: @challenger · from train")
    assert "| data | `/data/nav` · train 1,530 episodes / 91,800 frames |" in card
    assert "| split | episodes | this version | expert (same seeds) | champion v2 |" in card
    assert (
        "| **unseen_pair** (gate) | 200 | 41.5% [35.0%, 48.0%] | 96.0% [92.0%, 98.0%] | 37.3% [31.0%, 44.0%] |" in card
    )
    assert "| val | 200 | 60.0% [53.0%, 66.0%] | - | - |" in card
    assert "**rejected** against champion v2 (2026-12-07T05:00:00+00:00): failed: success_superior" in card
    assert "- FAIL: success_superior (0.350 >= 0.373)" in card
    link = "(#/experiments/7/runs/abcdef0123456789/artifactPath/evaluation/unseen_pair/trajectories.png)"
    assert f"- [trajectories, unseen_pair]{link}" in card


def test_card_before_any_evaluation_or_gate_says_what_to_run():
    card = render_model_card(card_facts(splits=[], gate={}, plots=[], champion_version=None))
    assert "No closed-loop evaluation yet" in card and "Not gated yet" in card and "None logged yet." in card


def test_card_fits_mlflows_description_column_keeping_the_gates_split():
    many_splits = [SplitRow(f"split_{i:03d}", Interval(0.5, 0.4, 0.6, 200)) for i in range(120)]
    primary = SplitRow("zz_primary", Interval(0.7, 0.6, 0.8, 200))
    plots = [(f"plot {i}", f"evaluation/split_{i:02d}/trajectories.png") for i in range(60)]
    card = render_model_card(card_facts(splits=[*many_splits, primary], primary_split="zz_primary", plots=plots))
    assert len(card) <= MAX_CHARS
    assert "| **zz_primary** (gate) |" in card and "| split_000 |" in card and "| split_119 |" not in card
    assert "[plot 0]" not in card  # plots go first: 120 split rows alone overflow the column


def test_split_rows_read_version_metrics_and_fill_a_missing_interval():
    metrics = {
        "closed_loop.success_rate": 0.5,  # the gate's unqualified key is no split
        "closed_loop.unseen_pair.success_rate": 0.5,
        "closed_loop.unseen_pair.episodes": 100.0,
        "closed_loop.unseen_pair.expert_success_rate": 0.9,
        "closed_loop.unseen_pair.expert_success_low": 0.85,
        "closed_loop.unseen_pair.expert_success_high": 0.95,
    }
    rows = split_rows(metrics, champion=None)
    assert [r.split for r in rows] == ["unseen_pair"]
    assert rows[0].policy.low == pytest.approx(0.4038, abs=1e-3) and rows[0].policy.high == pytest.approx(
        0.5962, abs=1e-3
    )
    assert rows[0].expert.text() == "90.0% [85.0%, 95.0%]" and rows[0].champion is None


def _description(version: str) -> str:
    return mlflow.MlflowClient().get_model_version(MODEL, version).description


def _register(tmp_path: Path, marker: str) -> str:
    model_dir = tmp_path / f"model-{marker}"
    (model_dir / "policy").mkdir(parents=True)
    (model_dir / "policy" / "config.json").write_text("{}")
    counts = {"counts": {"train": {"episodes": 6, "frames": 300}, "val": {"episodes": 2, "frames": 100}}}
    experiment = tracking.get_or_create_experiment("card-test")
    with mlflow.start_run(experiment_id=experiment, tags=dataset_tags(counts)) as run:
        mlflow.log_params({"data.path": "/data/tiny", "model.preset": "tiny", "scaling.use_gpu": "False"})
        mlflow.log_metric("best_step", 40)
    return tracking.register_policy(model_dir, run.info.run_id, name=MODEL, tags={"train_run": marker})


def _evaluate(version: str, success: float, tmp_path: Path) -> None:
    from mobile_vla.evaluate.closed_loop import log_to_version

    plot = tmp_path / "trajectories.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n")
    metrics = {
        "closed_loop.unseen_pair.success_rate": success,
        "closed_loop.unseen_pair.success_low": success - 0.05,
        "closed_loop.unseen_pair.success_high": success + 0.05,
        "closed_loop.unseen_pair.episodes": 200.0,
        "closed_loop.unseen_pair.expert_success_rate": 0.95,
        "closed_loop.unseen_pair.expert_success_low": 0.91,
        "closed_loop.unseen_pair.expert_success_high": 0.97,
        "closed_loop.success_rate": success,
        "closed_loop.episodes": 200.0,
    }
    log_to_version(
        MODEL, version, None, metrics, [plot], "unseen_pair", {"evaluation.closed_loop.split": "unseen_pair"}
    )


def test_description_is_the_card_and_is_rewritten_on_evaluation_and_gate(platform_home, tmp_path):
    from mobile_vla.tracking.lifecycle import GateConfig, promote

    v1 = _register(tmp_path, "a")
    card = _description(v1)
    assert "| data | `/data/tiny` · train 6 episodes / 300 frames; val 2 episodes / 100 frames |" in card
    assert "| model | preset tiny |" in card and "40 optimiser steps" in card and "CPU, 1 Ray Train worker" in card
    assert "No closed-loop evaluation yet" in card and "Not gated yet" in card

    _evaluate(v1, 0.40, tmp_path)
    card = _description(v1)
    assert "| **unseen_pair** (gate) | 200 | 40.0% [35.0%, 45.0%] | 95.0%" in card
    assert f"/runs/{mlflow.MlflowClient().get_model_version(MODEL, v1).run_id}/artifactPath/" in card
    assert "evaluation/unseen_pair/trajectories.png)" in card

    _evaluate(v1, 0.60, tmp_path)  # evaluated again: the card shows the new results only
    card = _description(v1)
    assert "60.0% [55.0%, 65.0%]" in card and "40.0%" not in card

    decision = promote(MODEL, version=v1, gate=GateConfig(min_episodes=100, max_offline_mae_regression=None))
    assert decision.promoted
    card = _description(v1)
    assert "@champion" in card and "**promoted** as the first champion" in card
    assert "champion (this version)" in card

    v2 = _register(tmp_path, "b")
    _evaluate(v2, 0.55, tmp_path)
    card = _description(v2)
    assert f"champion v{v1}" in card and "| 55.0% [50.0%, 60.0%] | 95.0%" in card
    assert (
        "| **unseen_pair** (gate) | 200 | 55.0% [50.0%, 60.0%] | 95.0% [91.0%, 97.0%] | 60.0% [55.0%, 65.0%] |" in card
    )
