"""The sweep in MLflow: its parent run, each trial's outcome on its child run, the summary table and
plot, and the best trial's checkpoint registered as a model version.

    run_id, client = parent_run(cfg, name, base)          # the same run again when a sweep name is reused
    trials = summarise(grid, cfg, sweep, planned, client)
    log_summary(client, result, cfg)
    version = register_trial(client, result.best, cfg, name)
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs
from mlflow import MlflowClient
from mlflow.entities import Param
from ray.train import Checkpoint

from mobile_vla.config import dump_config, flatten
from mobile_vla.errors import MobileVLAError
from mobile_vla.tracking import configure_mlflow, get_or_create_experiment, log_version_metrics, register_policy
from mobile_vla.tracking.provenance import provenance_tags
from mobile_vla.train.checkpointing import POLICY_DIR
from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.tune import plots
from mobile_vla.tune.sweep_config import TuneJobConfig
from mobile_vla.tune.trials import (
    CHECKPOINT_TAG,
    COMPLETED,
    FAILED,
    PARENT_TRIAL,
    STATUS_TAG,
    STOPPED,
    SWEEP_TAG,
    TRIAL_TAG,
    SweepResult,
    TrialSummary,
)

PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
PARAM_VALUE_CHARS = 6000  # MLflow's param value limit
HISTORY_KEYS = ("val_loss", "val_mae", "train_loss", "checkpoint_path")  # kept per epoch, after epoch and the metric


def parent_run(cfg: TuneJobConfig, name: str, base: TrainJobConfig) -> tuple[str, Any]:
    """(run_id, client): the sweep's parent run, the same one again when a sweep name is reused.

    A new parent run gets the tune settings, the search space and the base training config as params.
    """
    uri = configure_mlflow()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = get_or_create_experiment(cfg.mlflow.experiment)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{TRIAL_TAG}` = '{PARENT_TRIAL}'",
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, client
    tags = {**provenance_tags(), SWEEP_TAG: name, TRIAL_TAG: PARENT_TRIAL}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {f"tune.{k}": v for k, v in flatten(dump_config(cfg.tune)).items()}
    params.update({f"search_space.{k}": json.dumps({d.rule: d.values}) for k, d in cfg.search_space.items()})
    params.update({f"base.{k}": v for k, v in flatten(dump_config(base)).items()})
    rows = [
        Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:PARAM_VALUE_CHARS])
        for k, v in params.items()
    ]
    for start in range(0, len(rows), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=rows[start : start + PARAMS_PER_BATCH])
    return run_id, client


def _checkpoint_exists(path: str | None) -> bool:
    if not path:
        return False
    return "://" in path or Path(path).is_dir()


def _trial_summary(result, cfg: TuneJobConfig, keys: list[str], planned: int) -> TrialSummary:
    """One trial from its Tune result: per-epoch history, status, and its best epoch with a checkpoint."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    frame = result.metrics_dataframe
    rows = [] if frame is None or frame.empty else frame.to_dict("records")
    trial_id = str(
        (result.metrics or {}).get("trial_id")
        or (rows[-1].get("trial_id") if rows else "")
        or Path(result.path or "?").name
    )
    history = [
        {k: row.get(k) for k in ("epoch", metric, *HISTORY_KEYS) if k in row}
        for row in rows
        if metric in row and row[metric] == row[metric]  # NaN != NaN: epochs without the metric are left out
    ]
    with_checkpoint = [h for h in history if _checkpoint_exists(h.get("checkpoint_path"))]
    sign = 1.0 if mode == "min" else -1.0
    best_row = min(with_checkpoint, key=lambda h: sign * h[metric]) if with_checkpoint else None
    status = FAILED if result.error else (COMPLETED if len(history) >= planned else STOPPED)
    return TrialSummary(
        trial_id=trial_id,
        params={k: (result.config or {}).get(k) for k in keys},
        status=status,
        epochs=len(history),
        planned_epochs=planned,
        history=[{k: v for k, v in h.items() if k != "checkpoint_path"} for h in history],
        best={k: float(v) for k, v in (best_row or {}).items() if isinstance(v, (int, float))},
        checkpoint=best_row["checkpoint_path"] if best_row else None,
        error=f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:300]}" if result.error else None,
    )


def _close_child_run(client, run, summary: TrialSummary) -> None:
    """Tags the trial's child run with its outcome; closes it if the trial's driver could not."""
    summary.run_id = run.info.run_id
    client.set_tag(run.info.run_id, STATUS_TAG, summary.status)
    if summary.checkpoint:
        client.set_tag(run.info.run_id, CHECKPOINT_TAG, summary.checkpoint)
    ended_by_sweep = summary.status == STOPPED and run.info.status == "FAILED"  # fit() raised as ASHA ended it
    if run.info.status == "RUNNING" or ended_by_sweep:
        # ASHA (also at a rung that is the last epoch) or a failure ended this trial's driver before
        # it closed its run: its best epoch's metrics (as run_training logs them) and its end state
        for key, value in summary.best.items():
            client.log_metric(run.info.run_id, f"best_{key}", value)
        end_state = {COMPLETED: "FINISHED", STOPPED: "KILLED"}.get(summary.status, "FAILED")
        client.set_terminated(run.info.run_id, end_state)


def summarise(grid, cfg: TuneJobConfig, sweep: dict, planned: int, client) -> list[TrialSummary]:
    """One TrialSummary per trial from Tune's results; tags each child run with its outcome."""
    runs = {
        run.data.tags.get(TRIAL_TAG): run
        for run in client.search_runs(
            [client.get_run(sweep["parent_run_id"]).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}'",
            max_results=10_000,
        )
    }
    trials = []
    for result in grid:
        summary = _trial_summary(result, cfg, sweep["keys"], planned)
        run = runs.get(summary.trial_id)
        if run is not None:
            _close_child_run(client, run, summary)
        trials.append(summary)
    return trials


def summary_rows(trials: list[TrialSummary], metric: str) -> list[dict]:
    """One row per trial for the summary table: status, epochs, best values, sampled values, run id."""
    return [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            "epochs": f"{t.epochs}/{t.planned_epochs}",
            f"best_{metric}": t.best.get(metric),
            "best_val_mae": t.best.get("val_mae"),
            "best_epoch": t.best.get("epoch"),
            **{k: t.params.get(k) for k in sorted(t.params)},
            "mlflow_run_id": t.run_id,
        }
        for t in trials
    ]


def log_summary(client, result: SweepResult, cfg: TuneJobConfig) -> None:
    """Summary table (JSON table + CSV), plot and headline metrics on the parent run."""
    metric = cfg.tune.metric
    rows = summary_rows(result.trials, metric)
    columns = list(rows[0]) if rows else []
    client.log_table(result.parent_run_id, {c: [r[c] for r in rows] for c in columns}, "sweep/summary.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    client.log_text(result.parent_run_id, buffer.getvalue(), "sweep/summary.csv")
    client.log_text(
        result.parent_run_id, json.dumps([asdict(t) for t in result.trials], indent=2, default=str), "sweep/trials.json"
    )
    figure = plots.sweep_summary(result.trials, metric, cfg.tune.mode, result.best.trial_id if result.best else None)
    client.log_figure(result.parent_run_id, figure, "sweep/summary.png")
    counts = {status: sum(1 for t in result.trials if t.status == status) for status in (COMPLETED, STOPPED, FAILED)}
    metrics = {f"trials_{k.replace('-', '_')}": float(v) for k, v in counts.items()}
    metrics["concurrency"] = float(result.concurrency)
    if result.best is not None:
        metrics.update({f"best_{k}": v for k, v in result.best.best.items()})
        client.set_tag(result.parent_run_id, "mobile_vla.best_trial", result.best.trial_id)
    for key, value in metrics.items():
        client.log_metric(result.parent_run_id, key, value)


def load_checkpoint_policy_dir(checkpoint: str, into: Path) -> Path:
    """Copies a Train checkpoint's policy/ folder (local path or storage URI) into `into`/policy.

    Raises:
        MobileVLAError: a local checkpoint has no policy/ folder.
    """
    target = into / POLICY_DIR
    if "://" not in checkpoint:
        source = Path(checkpoint) / POLICY_DIR
        if not source.is_dir():
            raise MobileVLAError(f"{checkpoint}: checkpoint has no {POLICY_DIR}/ folder")
        shutil.copytree(source, target)
        return target
    filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
    with Checkpoint(path, filesystem=filesystem).as_directory() as local:
        shutil.copytree(Path(local) / POLICY_DIR, target)
    return target


def register_trial(client, trial: TrialSummary, cfg: TuneJobConfig, sweep_name: str) -> str:
    """The trial's best checkpoint as a new version of the registered model, with the alias.

    Raises:
        MobileVLAError: the trial has no MLflow run to register from.
    """
    if trial.run_id is None:
        raise MobileVLAError(f"sweep {sweep_name}: trial {trial.trial_id} has no MLflow run to register from")
    with tempfile.TemporaryDirectory() as tmp:
        load_checkpoint_policy_dir(trial.checkpoint, Path(tmp) / "model")
        tags = {
            "sweep": sweep_name,
            "trial_id": trial.trial_id,
            "epoch": str(trial.best.get("epoch")),
            **{f"param.{k}": json.dumps(v) for k, v in trial.params.items()},
        }
        version = register_policy(
            Path(tmp) / "model", trial.run_id, name=cfg.mlflow.registered_model, alias=cfg.mlflow.alias, tags=tags
        )
    log_version_metrics(
        cfg.mlflow.registered_model, version, {k: v for k, v in trial.best.items() if k.startswith("val_")}
    )
    return version
