"""A real 4-trial ASHA + Optuna sweep on the shared local cluster (tiny policy, tiny data), tracked in MLflow.

The sweep is built so ASHA must stop something: the first trial (points_to_evaluate) trains with a sound
learning rate, the other three sample theirs from [1e-7, 1e-6], where three epochs cannot move a model.
Every trial trains at most 4 steps per epoch (the ASHA logic needs epochs, rungs, not long epochs): 4 Adam
steps at 3e-3 are enough for the first trial's first-epoch validation loss to beat the others'.
Their first-epoch validation loss is worse than the first trial's, so ASHA (grace period 1, reduction
factor 2) stops at least one of them at the first or second rung, whatever order the two concurrent trials
report in. The sweep also combines its top 3 trials into an ensemble version (alias `ensemble`, so
`challenger` stays on the best single trial).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from ray.util.placement_group import placement_group_table

from mobile_vla.cli import main
from mobile_vla.policy import load_policy
from mobile_vla.policy.ensemble import EnsemblePolicy
from mobile_vla.tracking import configure_mlflow, resolve_model
from mobile_vla.tune.sweep import run_sweep
from mobile_vla.tune.sweep_config import TuneJobConfig

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = REPO / "jobs" / "configs" / "tune_tiny.yaml"
MODEL = "mobile-vla-policy"
SWEEP = "asha-test"

pytestmark = pytest.mark.slow  # a 4-trial sweep of real Ray Train runs: minutes on 2 cores
GOOD = {
    "optim.lr": 3.0e-3,
    "optim.weight_decay": 0.0,
    "model.overrides.lstm_hidden": 64,
    "data.window": 4,
    "data.chunk": 4,
    "data.augment_strength": 0.5,
    "model.overrides.fusion": "gated",
}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILE_VLA_HOME", str(path))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield path


def _config(tiny_dataset):
    data = yaml.safe_load(TUNE_TINY.read_text())
    data["train"]["overrides"] += [f"data.path={tiny_dataset}", "train.max_steps_per_epoch=4"]
    data["search_space"]["optim.lr"] = {"loguniform": [1.0e-7, 1.0e-6]}
    data["tune"].update(points_to_evaluate=[GOOD], driver_cpus=0.5)  # 4 CPUs: (4 - 1) // (1 + 0.5) = 2 at once
    data["run"]["name"] = SWEEP
    data["ensemble"] = {"members": 3, "alias": "ensemble"}
    return TuneJobConfig.model_validate(data)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_dataset, home):
    cfg = _config(tiny_dataset)
    return cfg, run_sweep(cfg, config_dir=TUNE_TINY.parent)


def _client():
    configure_mlflow()
    return MlflowClient()


def test_asha_stops_weak_trials_early_and_the_good_one_completes(sweep):
    cfg, result = sweep
    assert result.concurrency == 2 and len(result.trials) == 4
    stopped = [t for t in result.trials if t.status == "early-stopped"]
    assert stopped and all(t.epochs < 3 for t in stopped)
    first = next(t for t in result.trials if t.params["optim.lr"] == GOOD["optim.lr"])
    assert first.status == "completed" and first.epochs == 3
    assert all(
        t.params["data.chunk"] == 4 and 1e-7 <= t.params["optim.lr"] <= 1e-6 for t in result.trials if t is not first
    )  # Optuna sampled inside the space
    assert result.best.trial_id == first.trial_id
    assert result.best.best["val_loss"] == min(t.best["val_loss"] for t in result.trials if t.best)


def test_each_trial_is_a_child_run_of_the_sweep_run(sweep):
    _, result = sweep
    client = _client()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mobile_vla.best_trial"] == result.best.trial_id
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    trials = {
        r.data.tags["mobile_vla.trial_id"]: r for r in children if r.data.tags["mobile_vla.trial_id"] != "ensemble"
    }
    assert set(trials) == {t.trial_id for t in result.trials}  # 4 trial runs (+ the ensemble's run)
    for trial in result.trials:
        run = trials[trial.trial_id]
        assert run.data.tags["mobile_vla.tune.status"] == trial.status
        assert run.info.status == ("FINISHED" if trial.status == "completed" else "KILLED")
        epochs = {m.step for m in client.get_metric_history(run.info.run_id, "val_loss") if m.step > 0}
        reported = set(range(1, trial.epochs + 1))  # per-epoch curves in the child run
        # a stopped trial's worker may log one more epoch while Tune is ending it
        assert epochs == reported if trial.status == "completed" else reported <= epochs
        assert run.data.metrics["best_val_loss"] == pytest.approx(trial.best["val_loss"])
        assert run.data.params["optim.lr"] == str(trial.params["optim.lr"])


def test_sweep_summary_table_and_plot_are_on_the_parent_run(sweep):
    _, result = sweep
    client = _client()
    files = {a.path for a in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/summary.png", "sweep/summary.csv", "sweep/summary.json", "sweep/trials.json"} <= files
    png = Path(client.download_artifacts(result.parent_run_id, "sweep/summary.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = Path(client.download_artifacts(result.parent_run_id, "sweep/summary.csv")).read_text().splitlines()
    assert len(csv_rows) == 5 and "early-stopped" in "".join(csv_rows)
    metrics = client.get_run(result.parent_run_id).data.metrics
    assert metrics["trials_early_stopped"] >= 1 and metrics["trials_completed"] >= 1
    assert metrics["best_val_loss"] == pytest.approx(result.best.best["val_loss"])


def test_best_trial_is_registered_as_challenger(sweep, tiny_dataset):
    _, result = sweep
    version = _client().get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == result.model_version and version.run_id == result.best.run_id
    assert version.tags["trial_id"] == result.best.trial_id and version.tags["sweep"] == SWEEP
    model, preprocessing = load_policy(resolve_model(f"models:/{MODEL}@challenger").path)
    checkpoint, _ = load_policy(Path(result.best.checkpoint) / "policy")
    assert preprocessing.window == GOOD["data.window"] and model.config.lstm_hidden == 64
    for a, b in zip(model.state_dict().values(), checkpoint.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_top_trials_become_one_ensemble_version(sweep):
    _, result = sweep
    client = _client()
    version = client.get_model_version_by_alias(MODEL, "ensemble")
    assert str(version.version) == result.ensemble_version and version.tags["kind"] == "ensemble"
    ensemble, _ = load_policy(resolve_model(f"models:/{MODEL}@ensemble").path)
    assert isinstance(ensemble, EnsemblePolicy) and len(ensemble.members) == 3
    assert result.best.trial_id in ensemble.config.sources[0]  # best first
    metrics = client.get_run(version.run_id).data.metrics
    assert {"val_ensemble_mae", "val_best_member_mae", "val_member_2_mae"} <= set(metrics)


def test_no_placement_group_outlives_the_sweep(sweep, ray_cluster):
    """Stopped trials' worker groups are freed even without the dashboard's state API."""

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(1)
    assert live == []


def test_ensemble_cli_combines_an_earlier_sweep(sweep, tiny_dataset, home):
    code = main(
        [
            "ensemble",
            "--from-sweep",
            SWEEP,
            "--members",
            "2",
            "--config",
            str(TUNE_TINY),
            "--train-override",
            f"data.path={tiny_dataset}",
            "ensemble.alias=pair",
        ]
    )
    assert code == 0
    pair, _ = load_policy(resolve_model(f"models:/{MODEL}@pair").path)
    assert len(pair.members) == 2
    assert main(["ensemble", "--from-sweep", "no-such-sweep", "--config", str(TUNE_TINY)]) == 2


def test_tune_cli_check_and_bad_config(tiny_dataset, home, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search_space:\n  optim.lr: {uniform: [1.0, 0.1]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "mobile_vla.cli", "tune", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "search_space.optim.lr" in result.stderr and "low < high" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tune_cli_check_reports_trials_and_concurrency(ray_cluster, tiny_dataset, home, capsys):
    code = main(
        [
            "tune",
            "--config",
            str(TUNE_TINY),
            "--train-override",
            f"data.path={tiny_dataset}",
            "tune.driver_cpus=0.5",
            "--check",
        ]
    )
    assert code == 0
    assert "4 trials, 2 at a time, 7 searched keys" in " ".join(capsys.readouterr().out.split())  # rich wraps
