"""`mobile-vla evaluate`: argument errors as one line and exit 2; a full run onto a model version."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from mobile_vla.cli import main
from mobile_vla.tracking import get_version_metrics


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--model MODEL_URI is required"),
        (["--model", "expert"], "no offline metrics: add --closed-loop"),
        (["--model", "m"], "nothing to evaluate"),
        (["--model", "expert", "--closed-loop", "--split", "nope"], "'nope': not in the split spec"),
        (["--model", "expert", "--closed-loop", "--episodes", "0"], "--episodes 0"),
        (["--model", "m", "--closed-loop", "--endpoint", "http://127.0.0.1:9"], "--token-file"),
        (["--model", "m", "--endpoint", "http://127.0.0.1:9"], "add --closed-loop"),
        (["--model", "m", "--closed-loop", "--precision", "int8"], "--precision int8: add --no-log"),
        (["--model", "expert", "--closed-loop", "--precision", "int8", "--no-log"], "give --model MODEL_URI"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys, platform_home):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_data_folder_is_named(capsys, platform_home, tmp_path):
    assert main(["evaluate", "--model", "m", "--data", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


@pytest.mark.slow  # offline and closed loop (model and expert) in Ray tasks on two splits
def test_offline_and_closed_loop_onto_the_version(ray_cluster, tiny_dataset, registered_model, tmp_path, capsys):
    name, version = registered_model
    out = tmp_path / "results"
    argv = [
        "evaluate",
        "--model",
        f"models:/{name}@challenger",
        "--data",
        str(tiny_dataset),
        "--split",
        "val",
        "--split",
        "unseen_pair",
        "--closed-loop",
        "--episodes",
        "2",
        "--max-steps",
        "5",
        "--gifs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "expert (same seeds)" in printed and "Wilson" in printed

    metrics = get_version_metrics(name, version)
    for key in (
        "offline.val.mae",
        "offline.unseen_pair.r2_linear_x",
        "closed_loop.val.success_rate",
        "closed_loop.unseen_pair.collision_rate",
        "closed_loop.unseen_pair.expert_success_rate",
    ):
        assert key in metrics, key
    # the first --split is primary: the gate's unqualified keys come from it
    assert metrics["offline.mae"] == metrics["offline.val.mae"]
    assert metrics["closed_loop.episodes"] == 2
    assert metrics["closed_loop.success_rate"] == metrics["closed_loop.val.success_rate"]
    assert "closed_loop.unseen_pair.spl" not in metrics  # 5 steps: the expert solved none, so no SPL reference

    saved = json.loads((out / "unseen_pair" / "closed_loop.json").read_text())
    assert saved["seeds"] == [3_000_000, 3_000_002] and len(saved["episodes"]) == 2
    assert saved["policy"]["episodes"] == saved["expert"]["episodes"] == 2
    run_id = MlflowClient().get_model_version(name, version).run_id
    logged = {a.path.rsplit("/", 1)[-1] for a in MlflowClient().list_artifacts(run_id, "evaluation/val")}
    assert {"offline.json", "offline_actions.png", "closed_loop.json", "trajectories.png"} <= logged
