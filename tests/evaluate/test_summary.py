"""A closed-loop summary from episode rows (no simulator): failure AUROC, outcome x collision table,
their metrics, JSON and printed summary."""

from __future__ import annotations

import json
import math

import pytest

from mobile_vla.evaluate.closed_loop import ClosedLoopReport, PolicySummary
from mobile_vla.evaluate.commands import _print_summary


def row(outcome: str, collisions: int, confidence: float) -> dict:
    return {
        "outcome": outcome,
        "collisions": collisions,
        "mean_confidence": confidence,
        "steps": 10,
        "path_length": 2.0,
    }


POLICY = [
    row("success", 0, 0.9),
    row("success", 2, 0.7),
    row("success", 0, 0.5),
    row("timeout", 3, 0.6),
    row("timeout", 1, 0.2),
    row("wrong_target", 0, 0.5),
]
EXPERT = [row("success", 0, math.nan)] * 5 + [row("timeout", 1, math.nan)]


def report() -> ClosedLoopReport:
    return ClosedLoopReport(
        split="val",
        model="m",
        model_name=None,
        model_version=None,
        run_id=None,
        seeds=list(range(6)),
        policy=PolicySummary.from_rows(POLICY, EXPERT),
        expert=PolicySummary.from_rows(EXPERT, EXPERT),
        episodes=[],
        settings={},
        seconds=1.0,
    )


def test_failure_auroc_and_the_collision_table_from_rows():
    policy = PolicySummary.from_rows(POLICY, EXPERT)
    # failures 0.6, 0.2, 0.5 against successes 0.9, 0.7, 0.5: 7.5 of 9 pairs ordered (tests/sim/test_success.py)
    assert policy.failure_auroc == pytest.approx(7.5 / 9)
    assert policy.collisions_by_outcome == {
        "success": {"collided": 1, "no_collision": 2},
        "wrong_target": {"collided": 0, "no_collision": 1},
        "timeout": {"collided": 2, "no_collision": 0},
    }
    total = sum(sum(cell.values()) for cell in policy.collisions_by_outcome.values())
    assert total == policy.episodes
    expert = PolicySummary.from_rows(EXPERT, EXPERT)
    assert math.isnan(expert.failure_auroc)  # the expert reports no confidence


def test_report_metrics_json_and_printed_summary_carry_them(capsys, tmp_path):
    closed = report()
    metrics = closed.metrics()
    assert metrics["closed_loop.val.failure_auroc"] == pytest.approx(7.5 / 9)
    assert metrics["closed_loop.val.collided_timeout"] == pytest.approx(2 / 6)
    document = json.loads(json.dumps(closed.to_dict()))
    assert document["policy"]["collisions_by_outcome"]["timeout"] == {"collided": 2, "no_collision": 0}
    assert document["policy"]["failure_auroc"] == pytest.approx(7.5 / 9)
    assert document["expert"]["failure_auroc"] is None

    _print_summary({"val": {"closed_loop": closed}}, tmp_path)
    printed = capsys.readouterr().out
    assert "confidence: failure AUROC" in printed and "0.833" in printed
    assert "episodes by outcome x collision" in printed
    timeout_line = next(line for line in printed.splitlines() if "timeout" in line and "|" in line)
    assert "2 | 1" in timeout_line and "0 | 0" in timeout_line
