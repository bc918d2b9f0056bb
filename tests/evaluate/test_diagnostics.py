"""The state ablation: a tiny random-weight policy on a generated split, the state recorded, zeroed and
shuffled; the CLI table and JSON; its argument errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import ConfigError
from mobile_vla.evaluate.diagnostics import STATE_VARIANTS, StateReplaced, ablation_metrics, state_ablation
from mobile_vla.policy.checkpoint import load_policy
from mobile_vla.train.windows import WindowDataset, window_starts


def test_state_replaced_zeroes_or_borrows_another_windows_state(tiny_dataset, tiny_model_dir):
    _, preprocessing = load_policy(tiny_model_dir)
    dataset = WindowDataset(tiny_dataset, "train", preprocessing, stride=preprocessing.window)
    zeroed, shuffled = StateReplaced(dataset, "zeroed"), StateReplaced(dataset, "shuffled", seed=1)
    assert sorted(shuffled.source) == list(range(len(dataset)))  # a permutation of the windows
    assert np.any(shuffled.source != np.arange(len(dataset)))
    for i in range(len(dataset)):
        original = dataset[i]
        np.testing.assert_array_equal(zeroed[i]["state"], np.zeros_like(original["state"]))
        np.testing.assert_array_equal(shuffled[i]["state"], dataset[int(shuffled.source[i])]["state"])
        np.testing.assert_array_equal(shuffled[i]["images"], original["images"])  # only the state changes
        np.testing.assert_array_equal(shuffled[i]["actions"], original["actions"])
    with pytest.raises(ConfigError, match="'mean': expected one of recorded, zeroed, shuffled"):
        StateReplaced(dataset, "mean")


def test_state_ablation_returns_three_rows_on_the_same_frames(tiny_dataset, tiny_model_dir):
    rows = state_ablation(str(tiny_model_dir), tiny_dataset, "val", batch_size=4)
    assert [r["state"] for r in rows] == list(STATE_VARIANTS)
    manifest = load_manifest(tiny_dataset)
    lengths = [manifest["episodes"][n]["frames"] for n in manifest["splits"]["val"]]
    window = load_policy(tiny_model_dir)[1].window
    # stride W: every frame once, plus the overlap of each episode's last window (it ends on the last frame)
    windows = sum(len(window_starts(n, window, window)) for n in lengths)
    for row in rows:
        assert row["windows"] == windows
        assert row["frames"] == sum(
            n if n <= window else len(window_starts(n, window, window)) * window for n in lengths
        )
        assert 0.0 < row["mae"] <= row["rmse"]
        assert row["mae"] == pytest.approx(np.mean([row[f"mae_{a}"] for a in ("linear_x", "linear_y", "angular_z")]))
    assert rows[1]["mae"] != rows[0]["mae"] and rows[2]["mae"] != rows[0]["mae"]  # the state input matters here
    metrics = ablation_metrics("val", rows)
    assert metrics["diagnostics.val.state_zeroed.mae"] == rows[1]["mae"]
    assert all(math.isfinite(v) for v in metrics.values())


def test_cli_prints_the_table_and_writes_json(tiny_dataset, tiny_model_dir, tmp_path, capsys, platform_home):
    out = tmp_path / "results"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--split", "val"]
    assert main([*argv, "--state-ablation", "--no-offline", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "state ablation val" in printed
    for variant in STATE_VARIANTS:
        assert variant in printed
    saved = json.loads((out / "val" / "state_ablation.json").read_text())
    assert [r["state"] for r in saved["rows"]] == list(STATE_VARIANTS) and saved["split"] == "val"
    assert not (out / "val" / "offline.json").exists()  # --no-offline


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--state-ablation"], "--state-ablation needs --data DIR"),
        (["--model", "expert", "--data", "d", "--state-ablation"], "--state-ablation scores a model's own state"),
    ],
)
def test_state_ablation_argument_errors(argv, message, capsys, platform_home):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
