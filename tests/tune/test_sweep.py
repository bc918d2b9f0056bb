"""A real 4-trial ASHA + Optuna sweep on the shared local cluster (tiny policy, tiny data), tracked in MLflow,
run as a user types it: `mobile-vla tune --config FILE KEY=VALUE ...`, the installed console script in its own
process, started from a scratch directory and joined to the session's cluster through RAY_ADDRESS. FILE is
jobs/configs/tune_tiny.yaml with the changes below (its base preset's path made absolute, so that it resolves
from the scratch directory); the overrides set both the sweep (run.name, tune.driver_cpus) and the training
preset (data.path, train.max_steps_per_epoch). The tests read the sweep's outcome where the sweep recorded it:
the parent MLflow run (sweep/trials.json, its tags and metrics), its child runs and the registry.

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

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from ray.experimental.internal_kv import _internal_kv_list
from ray.util.placement_group import placement_group_table

from mobile_vla.cli import main
from mobile_vla.policy import load_policy
from mobile_vla.policy.ensemble import EnsemblePolicy
from mobile_vla.tracking import configure_mlflow, resolve_model
from mobile_vla.tune.placement_cleanup import KV_NAMESPACE
from mobile_vla.tune.sweep_config import TuneJobConfig, load_tune_config, split_overrides
from mobile_vla.tune.trials import ENSEMBLE_TRIAL, PARENT_TRIAL, SWEEP_TAG, TRIAL_TAG, SweepResult, TrialSummary

REPO = Path(__file__).resolve().parents[2]
TUNE_TINY = REPO / "jobs" / "configs" / "tune_tiny.yaml"
MOBILE_VLA_SCRIPT = str(Path(sys.executable).parent / "mobile-vla")  # the installed console script
MODEL = "mobile-vla-policy"
SWEEP = "asha-test"
SWEEP_TIMEOUT_S = 900  # as pyproject's per-test timeout (which also counts setup): a hang guard, not a bound

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


def _write_config(folder: Path) -> Path:
    """tune_tiny.yaml with the sweep's search space, first point and ensemble, as a file the CLI reads."""
    data = yaml.safe_load(TUNE_TINY.read_text())
    data["train"]["config"] = str(REPO / data["train"]["config"])  # relative to the repository, not to `folder`
    data["search_space"]["optim.lr"] = {"loguniform": [1.0e-7, 1.0e-6]}
    data["tune"]["points_to_evaluate"] = [GOOD]
    data["ensemble"] = {"members": 3, "alias": "ensemble"}
    path = folder / "tune_asha.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _overrides(tiny_dataset) -> list[str]:
    return [
        f"data.path={tiny_dataset}",
        "train.max_steps_per_epoch=4",
        "tune.driver_cpus=0.5",  # 4 CPUs: (4 - 1) // (1 + 0.5) = 2 at once
        f"run.name={SWEEP}",
    ]


@pytest.fixture(scope="module")
def sweep_process(ray_cluster, tiny_dataset, home, tmp_path_factory):
    """The finished `mobile-vla tune` process (its exit code and output), run from a scratch directory."""
    config = _write_config(tmp_path_factory.mktemp("tune_config"))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [MOBILE_VLA_SCRIPT, "tune", "--config", str(config), *_overrides(tiny_dataset)]
    cwd = tmp_path_factory.mktemp("tune_cwd")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)


def _recorded_result(cfg: TuneJobConfig) -> SweepResult:
    """The sweep's outcome as it recorded it: the trials (sweep/trials.json of the parent run), the number
    at once (its `concurrency` metric), the best trial (ranked as the sweep ranks them), the version of the
    best trial (the parent's `mobile_vla.model_version` tag) and the ensemble's (registered from the
    parent's `ensemble` child run)."""
    client = _client()
    experiment_id = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{SWEEP}'")
    [parent] = [r for r in runs if r.data.tags[TRIAL_TAG] == PARENT_TRIAL]
    [ensemble_run] = [r for r in runs if r.data.tags[TRIAL_TAG] == ENSEMBLE_TRIAL]
    trials = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/trials.json")).read_text())
    result = SweepResult(
        name=SWEEP,
        parent_run_id=parent.info.run_id,
        trials=[TrialSummary(**trial) for trial in trials],
        best=None,
        model_version=parent.data.tags.get("mobile_vla.model_version"),
        concurrency=int(parent.data.metrics["concurrency"]),
    )
    ranked = result.ranked(cfg.tune.metric, cfg.tune.mode)
    result.best = ranked[0] if ranked else None
    [ensemble_version] = client.search_model_versions(f"run_id = '{ensemble_run.info.run_id}'")
    result.ensemble_version = str(ensemble_version.version)
    return result


@pytest.fixture(scope="module")
def sweep(sweep_process, tiny_dataset):
    """(the tune config as the CLI read it, the sweep's result as MLflow holds it)."""
    done = sweep_process
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = done.args[done.args.index("--config") + 1]
    cfg = load_tune_config(config, *split_overrides(_overrides(tiny_dataset)))
    return cfg, _recorded_result(cfg)


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
    """Stopped trials' worker groups are freed even without the dashboard's state API. The sweep ran in its
    own process, and Ray removes a finished job's groups itself; so the sweep's own bookkeeping is checked
    too: every worker group its trials recorded in the GCS was released (its record deleted) by the sweep."""

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(1)
    assert live == []
    assert _internal_kv_list(f"{SWEEP}/", namespace=KV_NAMESPACE) == []


def test_tune_console_script_exits_cleanly_and_records_the_code_that_ran(sweep_process):
    """The sweep as a user types it (see the module docstring): the installed console script in its own
    process (the CLI's rich console reaches Tune's callbacks, which Tune pickles: issue 19 found
    `cannot pickle '_thread.RLock'` there) exits 0 with neither a deprecation warning nor a traceback,
    prints the registered version, tags it with the sweep's name (run.name=, a sweep override), and the
    best trial's training run records the code that ran it (git commit, package version)."""
    done = sweep_process
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "deprecated" not in done.stderr and "Traceback" not in done.stderr
    assert "models:/mobile-vla-policy/" in done.stdout
    client = _client()
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert version.tags["sweep"] == SWEEP
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    tags = client.get_run(version.run_id).data.tags  # the trial's training run records the code that ran it
    assert tags["mlflow.source.git.commit"] == head.strip() and tags["mobile_vla.version"] == "0.1.0"


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
