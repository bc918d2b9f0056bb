"""benchmarks/quality.py: the pure parts (CPU accounting, budget, argument checks, the stage commands) and one
tiny end-to-end run of every stage (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mobile_vla.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EVAL_SEEDS = 1  # closed-loop scene seeds per held-out split in the tiny end-to-end run


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality.py as a module (it imports MLflow: loaded by the tests that use it, not at collection)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))  # it imports its sibling ablation_report, as the script does
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


PROC_STAT = """cpu  100 20 30 5000 40 5 6 7 0 0
cpu0 50 10 15 2500 20 2 3 3 0 0
intr 12345
"""


def test_busy_cpu_seconds_counts_user_nice_system_irq_softirq_steal_not_idle_or_iowait(quality):
    assert quality.busy_cpu_seconds(PROC_STAT, 100) == pytest.approx((100 + 20 + 30 + 5 + 6 + 7) / 100)


def test_busy_cpu_seconds_without_the_aggregate_line_is_an_error(quality):
    with pytest.raises(ValueError, match="cpu"):
        quality.busy_cpu_seconds("cpu0 1 2 3 4 5 6 7 8\n", 100)


def test_parent_pid_survives_spaces_and_parentheses_in_the_command_name(quality):
    assert quality.parent_pid("4242 (ray::IDLE (x) y) S 77 4242 1 0 -1") == 77


def test_a_stage_is_the_difference_of_two_samples(quality):
    before, after = quality.CpuSample(10.0, 100.0, 5.0), quality.CpuSample(70.04, 190.0, 90.5)
    stage = quality.Stage.measured("bc", "train", ["x"], 0, before, after)
    assert (stage.wall_s, stage.box_cpu_s, stage.tree_cpu_s) == (60.0, 90.0, 85.5)


def _stage(quality, name, kind, box, tree):
    return quality.Stage(name, kind, [], 0, wall_s=1.0, box_cpu_s=box, tree_cpu_s=tree)


def test_the_budget_counts_bc_and_updates_only_with_the_larger_measure(quality):
    stages = [
        _stage(quality, "data", "data", 600, 500),
        _stage(quality, "bc", "train", 1800, 1740),
        _stage(quality, "promote_bc", "register", 6, 5),
        _stage(quality, "collect_1", "collect", 300, 290),
        _stage(quality, "update_1", "update", 600, 720),
        _stage(quality, "eval_bc", "eval", 900, 880),
    ]
    budget = quality.training_budget(stages, 60.0)
    assert budget["stages"] == ["bc", "update_1"]
    assert (budget["box_cpu_min"], budget["tree_cpu_min"], budget["counted_cpu_min"]) == (40.0, 41.0, 41.0)
    assert budget["over_budget"] is False
    assert quality.training_budget(stages, 40.0)["over_budget"] is True


def test_the_expert_share_follows_the_schedule_and_the_last_value_repeats(quality):
    assert [quality.beta_for_round([0.5, 0.3], r) for r in (1, 2, 3, 4)] == [0.5, 0.3, 0.3, 0.3]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--episodes", "0"], "--episodes: 0"),
        (["--rounds", "-1"], "--rounds: -1"),
        (["--betas", "0.5", "1.5"], "--betas: [1.5]"),
        (["--val-fraction", "1"], "--val-fraction: 1"),
        (["--action-noise", "2"], "--action-noise: 2"),
        (["--budget-cpu-min", "0"], "--budget-cpu-min: 0"),
        (["--splits", "unseen_layout", "moon"], "--splits: ['moon']"),
        (["--config", "no/such.yaml"], "--config: no/such.yaml"),
        (["--train-set", "train.epochs"], "--train-set: 'train.epochs'"),
        (["--finetune-steps", "0"], "--finetune-steps: 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag_and_the_value(quality, argv, named):
    with pytest.raises(ConfigError) as err:
        quality.parse_args(argv)
    assert named in str(err.value)


def test_main_answers_bad_settings_with_exit_2_before_running_anything(quality, tmp_path, capsys):
    assert quality.main(["--episodes", "0", "--home", str(tmp_path / "home")]) == 2
    assert "--episodes: 0" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_the_defaults_are_the_documented_recipe(quality):
    args = quality.parse_args([])
    assert args.config == ROOT / "jobs/configs/small.yaml"
    assert args.action_noise == 0.0
    assert (args.rounds, args.betas, args.eval_episodes, args.budget_cpu_min) == (2, [0.5, 0.3], 200, 60.0)
    assert args.splits == ["unseen_layout", "unseen_pair", "unseen_paraphrase"]
    assert args.home == ROOT / ".mobile_vla" / "quality"


def test_generated_data_goes_to_train_and_val_only(quality):
    args = quality.parse_args(["--episodes", "50", "--val-fraction", "0.2", "--action-noise", "0.1"])
    command = quality.generate_command(args, Path("/d"))
    assert "--set" not in command  # the plain KEY=VALUE overrides, not the deprecated flag
    sets = dict(a.split("=") for a in command if a.startswith("splits."))
    assert sets.pop("splits.train.fraction") == "0.8" and sets.pop("splits.val.fraction") == "0.2"
    assert set(sets) >= {f"splits.{s}.fraction" for s in quality.EVAL_SPLITS}
    assert set(sets.values()) == {"0"}
    assert command[command.index("--action-noise") + 1] == "0.1"


def test_a_round_drives_and_fine_tunes_the_previous_model_into_its_own_alias(quality):
    args = quality.parse_args(["--finetune-steps", "7", "--update-set", "finetune.lr=1e-4"])
    feedback = Path("/h/feedback/run/round-2")
    collect = quality.collect_command(args, Path("/d"), "dagger-1", 2, feedback)
    assert collect[collect.index("--model") + 1] == "models:/mobile-vla-policy@dagger-1"
    assert collect[collect.index("--beta") + 1] == "0.3" and "--in-process" in collect
    assert collect[collect.index("--feedback-dir") + 1] == str(feedback)
    update = quality.update_command(args, Path("/d"), "dagger-1", 2, feedback)
    for expected in (
        "champion_alias=dagger-1",
        "challenger_alias=dagger-2",
        f"feedback.root={feedback}",
        "replay.data=/d",
        "finetune.steps=7",
        "finetune.lr=1e-4",
    ):
        assert expected in update


@pytest.mark.slow
def test_a_tiny_run_completes_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "results" / "quality.json"
    # Plumbing, not quality: one scene seed per held-out split is enough to fill every row and split (each
    # closed-loop episode costs a few CPU seconds for the model and again for the expert).
    argv = "--preset tiny --episodes 12 --epochs 1 --rounds 1 --collect-episodes 4 --finetune-steps 5"
    argv += f" --eval-episodes {EVAL_SEEDS} --home {tmp_path / 'home'} --out {out}"
    env = {k: v for k, v in os.environ.items() if k not in ("MOBILE_VLA_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), *argv.split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed"] is None
    names = [s["name"] for s in report["stages"]]
    assert names == ["data", "bc", "promote_bc", "collect_1", "update_1", "eval_bc", "eval_dagger-1"]
    for stage in report["stages"]:
        assert stage["wall_s"] > 0 and stage["box_cpu_s"] > 0 and stage["tree_cpu_s"] > 0, stage
    budget = report["training_cpu"]
    assert budget["stages"] == ["bc", "update_1"] and budget["counted_cpu_min"] > 0
    bc, round_1 = report["models"]
    assert round_1["parent"] == bc["version"] and round_1["version"] != bc["version"]
    assert round_1["gate"]["decision"] in ("promoted", "rejected")
    assert report["dataset"]["episodes"].keys() == {"train", "val"}
    rows = report["closed_loop"]["rows"]
    assert [r["row"] for r in rows] == ["bc", "dagger-1"]
    assert all(r["pooled"]["episodes"] == EVAL_SEEDS * 3 for r in rows)  # every seed on the 3 held-out splits
    assert "| bc |" in done.stdout and "training" in done.stdout.lower()
