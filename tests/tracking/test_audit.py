"""The audit of alias moves on a real MLflow SQLite registry: promote through the CLI records who,
from which version to which and why; a move made outside the platform (a plain MlflowClient call, as
the MLflow UI makes it) is recorded once as `detected`, however many watchers see it; `models
history` prints the records newest first, as a table or JSON. The watcher inside the Serve ingress
is tested in tests/serve/test_alias_audit.py, the MLflow UI itself in a real browser there too."""

from __future__ import annotations

import json
import threading

import pytest
from mlflow import MlflowClient

from mobile_vla import tracking
from mobile_vla.cli import main
from mobile_vla.tracking.audit import AUDIT_TAG_PREFIX, DETECTED, alias_history, detect_alias_move, set_alias
from tests.tracking.test_lifecycle import MODEL, eval_metrics, register_version


def champion_moves() -> list[tracking.AliasMove]:
    return alias_history(MODEL, "champion")


def audit_tags() -> dict[str, str]:
    tags = MlflowClient().get_registered_model(MODEL).tags
    return {k: v for k, v in tags.items() if k.startswith(AUDIT_TAG_PREFIX)}


def test_cli_promote_records_each_move_with_its_reason_and_history_prints_them(platform_home, tmp_path, capsys):
    v1 = register_version(tmp_path, "a", eval_metrics(0.60))
    argv = ["promote", "--model", MODEL, "--gate", "min_episodes=100"]
    assert main([*argv, "--version", v1, "--reason", "first release"]) == 0
    v2 = register_version(tmp_path, "b", eval_metrics(0.80, mae=0.09))
    assert main([*argv, "--from-alias", "challenger", "--reason", "night shift says go"]) == 0
    capsys.readouterr()

    second, first = champion_moves()
    assert (first.from_version, first.to_version, first.seq) == (None, v1, 1)
    assert (second.from_version, second.to_version, second.seq) == (v1, v2, 2)
    for move in (first, second):
        assert move.actor == "cli promote" and "@" in move.by
        assert move.time.endswith("+00:00") and move.time >= first.time
    assert first.reason.startswith("operator: first release; gate promoted: passed")
    assert second.reason.startswith("operator: night shift says go; gate promoted: passed")
    (kept,) = alias_history(MODEL, "previous-champion")
    assert (kept.from_version, kept.to_version, kept.actor) == (None, v1, "cli promote")
    assert kept.reason == f"kept for rollback: @champion moved {v1} -> {v2}"
    challenger = alias_history(MODEL, "challenger")  # registration moved it: recorded too
    assert [(m.from_version, m.to_version, m.actor) for m in challenger] == [
        (v1, v2, "register"),
        (None, v1, "register"),
    ]

    assert main(["models", "history", "--model", MODEL, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 5 and printed == sorted(printed, key=lambda r: r["time"], reverse=True)
    assert printed[0]["alias"] in ("champion", "previous-champion") and printed[0]["time"] >= second.time
    assert {"alias": "champion", "from_version": v1, "to_version": v2, "actor": "cli promote"}.items() <= next(
        r for r in printed if r["alias"] == "champion"
    ).items()
    assert main(["models", "history", "--model", MODEL, "--alias", "champion", "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "@champion" in table and "night shift says go" in table and "first release" not in table

    assert main(["models", "history", "--model", "no-such-model"]) == 2
    assert "no-such-model: no such registered model" in capsys.readouterr().err
    assert main(["models", "history", "--model", MODEL, "--limit", "0"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


def test_a_move_made_outside_the_platform_is_recorded_once_however_many_watchers_see_it(
    platform_home, tmp_path, capsys
):
    v1 = register_version(tmp_path, "a", eval_metrics(0.60))
    v2 = register_version(tmp_path, "b", eval_metrics(0.70))
    set_alias(MODEL, "champion", v1, actor="cli promote", reason="first")
    assert detect_alias_move(MODEL, "champion", detector="watcher-a") is None  # the audit is up to date

    MlflowClient().set_registered_model_alias(MODEL, "champion", v2)  # exactly what the MLflow UI sends
    assert main(["models", "history", "--model", MODEL]) == 0  # read-only: names the unrecorded move
    assert f"@champion points at version {v2} but its last record says {v1}" in capsys.readouterr().err

    barrier, found = threading.Barrier(4), []

    def watcher(i: int) -> None:  # four ingress replicas polling at the same moment
        barrier.wait()
        found.append(detect_alias_move(MODEL, "champion", detector=f"watcher-{i}"))

    threads = [threading.Thread(target=watcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(m is not None for m in found)
    assert detect_alias_move(MODEL, "champion", detector="watcher-late") is None
    latest, earlier = champion_moves()
    assert (latest.actor, latest.from_version, latest.to_version, latest.seq) == (DETECTED, v1, v2, 2)
    assert latest.by.startswith("watcher-") and "moved outside the platform" in latest.reason
    assert (earlier.actor, earlier.to_version) == ("cli promote", v1)
    assert len([k for k in audit_tags() if ".champion." in k]) == 2

    # Moved by hand again, then by the platform before any watcher looked: both moves are recorded.
    MlflowClient().set_registered_model_alias(MODEL, "champion", v1)
    move = set_alias(MODEL, "champion", v2, actor="rollout", reason="canary healthy")
    moves = champion_moves()
    assert [(m.seq, m.actor, m.from_version, m.to_version) for m in moves[:2]] == [
        (4, "rollout", v1, v2),
        (3, DETECTED, v2, v1),
    ]
    assert move == moves[0] and moves[1].by.startswith("rollout on ")
    assert set_alias(MODEL, "champion", v2, actor="rollout") is None  # no move, no record
    assert len(champion_moves()) == 4


def test_a_watcher_racing_the_platforms_move_leaves_one_record(platform_home, tmp_path):
    """A watcher that sees the alias after `set_alias` moved it but before its record is written records a
    detected move under the same number: reading keeps the platform's record of that move only."""
    v1 = register_version(tmp_path, "a", eval_metrics(0.60))
    v2 = register_version(tmp_path, "b", eval_metrics(0.70))
    set_alias(MODEL, "champion", v1, actor="cli promote")
    client = MlflowClient()
    client.set_registered_model_alias(MODEL, "champion", v2)  # set_alias's first step ...
    seen = detect_alias_move(MODEL, "champion", detector="watcher")  # ... a watcher looks ...
    assert seen is not None and seen.seq == 2
    platform = tracking.AliasMove(MODEL, "champion", 2, v1, v2, seen.time, "cli promote", "op@host", "passed")
    client.set_registered_model_tag(MODEL, platform.key, platform.tag_value())  # ... then its record lands
    assert set(audit_tags()) >= {seen.key, platform.key} and seen.key != platform.key
    assert champion_moves()[0] == platform and len(champion_moves()) == 2


def test_a_record_stays_within_the_sql_stores_column_and_an_unreadable_tag_is_ignored(platform_home, tmp_path):
    v1 = register_version(tmp_path, "a", eval_metrics(0.60))
    move = set_alias(MODEL, "champion", v1, actor="cli promote", reason="x" * 20_000)
    assert len(audit_tags()[move.key]) < 5000  # PostgreSQL enforces the registry's VARCHAR(5000)
    MlflowClient().set_registered_model_tag(MODEL, f"{AUDIT_TAG_PREFIX}champion.000009", "not json")
    assert [m.seq for m in champion_moves()] == [1]


@pytest.mark.parametrize("alias", ["champion", "previous-champion", "canary_eu-1"])
def test_audit_keys_are_valid_mlflow_tag_keys(alias):
    from mlflow.utils.validation import _validate_tag_name

    from mobile_vla.tracking.audit import audit_key

    for detected in (False, True):
        _validate_tag_name(audit_key(alias, 12, detected=detected))
