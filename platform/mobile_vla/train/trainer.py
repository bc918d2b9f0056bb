"""The driver side of a training run: checks, Ray Train V2 `TorchTrainer`, MLflow run and registration.

    result = run_training(load_train_config("jobs/configs/small.yaml"))
    result.model_version          # registered as models:/mobile-vla-policy@challenger

`build_trainer` only constructs (Ray Tune trials call it per trial); `run_training` does the whole job:
preflight (config, data, cluster resources) -> preprocessing from the manifest -> MLflow run (the same
one again when a run name is reused, so a resumed run keeps one history) -> `fit()` -> the best
checkpoint by `train.select_by` (validation loss by default) becomes a new version of the registered
model with the alias.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mobile_vla.config import dump_config, flatten
from mobile_vla.errors import DataError
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.policy.text import build_tokenizer
from mobile_vla.tracking import (
    configure_mlflow,
    get_or_create_experiment,
    log_version_metrics,
    register_policy,
    set_alias,
)
from mobile_vla.tracking.model_card import dataset_tags
from mobile_vla.tracking.provenance import provenance_tags
from mobile_vla.train import checkpointing, plots
from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.train.loop import train_loop_per_worker
from mobile_vla.train.pipeline import build_window_dataset
from mobile_vla.train.preflight import preflight
from mobile_vla.train.progress import TerminalProgress, progress_queue
from mobile_vla.train.safety_calibration import calibrate_policy_dir
from mobile_vla.train.windows import AugmentConfig, build_split_index

log = logging.getLogger(__name__)

RUN_NAME_TAG = "mobile_vla.train_run"


@dataclass
class TrainResult:
    """What a finished training run produced: the best checkpoint, its metrics, the MLflow run and version."""

    best_checkpoint_dir: Path | None  # on the run's storage (local path or URI)
    metrics: dict  # validation metrics of the best checkpoint
    run_id: str | None  # MLflow run
    model_version: str | None  # registered version (None when mlflow.registered_model is null)
    run_name: str = ""
    storage_path: str = ""
    final_metrics: dict = field(default_factory=dict)  # the last epoch's metrics


def default_run_name(cfg: TrainJobConfig) -> str:
    """`<preset>-<YYYYmmdd-HHMMSS>`: a fresh name per launch."""
    return f"{cfg.model.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def with_run_name(cfg: TrainJobConfig) -> TrainJobConfig:
    """A copy whose run.name is set (a fresh name per launch unless the config names the run)."""
    if cfg.run.name:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = default_run_name(cfg)
    return cfg


def build_preprocessing(cfg: TrainJobConfig, manifest: dict, policy_config) -> Preprocessing:
    """The run's preprocessing: the dataset's statistics and resize rule, the policy's tokenizer and
    state input (what its training windows, closed loop and robots put in the state).
    """
    return Preprocessing.from_manifest(
        manifest,
        build_tokenizer(policy_config),
        window=cfg.data.window,
        chunk=cfg.data.chunk,
        state_input=policy_config.state_input,
    )


def build_datasets(cfg: TrainJobConfig, preprocessing) -> tuple[dict, int]:
    """Ray Data pipelines of windows (Train splits each equally across workers) and the train window count.

    Training augmentation draws fresh each pass (seed=None) so epochs see different frames; the window
    order is fixed by train.seed and reshuffled per epoch in the loop's local shuffle buffer.
    """
    folder = cfg.data_path()
    labels = cfg.loss.frame_labels()  # the simulator labels the auxiliary heads learn, if they train
    train_windows = len(build_split_index(folder, cfg.data.train_split, preprocessing, cfg.data.stride, labels))
    train = build_window_dataset(
        folder,
        cfg.data.train_split,
        preprocessing,
        augment=cfg.data.augment,
        stride=cfg.data.stride,
        seed=None if cfg.data.augment else cfg.train.seed,
        shuffle=True,
        augment_config=augment_config(cfg.data.augment_strength),
        frame_labels=labels,
    )
    if cfg.train.max_steps_per_epoch:
        cap = cfg.train.max_steps_per_epoch * cfg.train.batch_size * cfg.optim.accumulate * cfg.scaling.num_workers
        if cap < train_windows:
            train, train_windows = train.limit(cap), cap
    val = build_window_dataset(
        folder, cfg.data.val_split, preprocessing, augment=False, shuffle=False, frame_labels=labels
    )
    for dataset in (train, val):  # one progress line per epoch from rank 0 says more than Ray Data's bars
        dataset.context.enable_progress_bars = False
    return {"train": train, "val": val}, train_windows


def augment_config(strength: float):
    """The data pipeline's default augmentation ranges scaled by `strength` (0 = none, 1 = defaults)."""
    base = AugmentConfig()
    return AugmentConfig(
        max_rotation_deg=base.max_rotation_deg * strength,
        brightness=min(base.brightness * strength, 0.95),
        contrast=min(base.contrast * strength, 0.95),
    )


def steps_per_epoch(cfg: TrainJobConfig, train_windows: int) -> int:
    """Optimiser steps per epoch on each worker (equal shards: floor(N / workers) windows each)."""
    per_worker = train_windows // cfg.scaling.num_workers
    micro_batches = math.ceil(per_worker / cfg.train.batch_size)
    return max(1, math.ceil(micro_batches / cfg.optim.accumulate))


def loop_config(
    cfg: TrainJobConfig, preprocessing, train_windows: int, run_id: str | None, tracking_uri: str | None
) -> dict:
    """The `config` every Train worker receives (see `loop.train_loop_per_worker`), preprocessing packed."""
    with tempfile.TemporaryDirectory() as tmp:
        preprocessing.save(tmp)
        packed = checkpointing.pack_folder(tmp)
    return {
        "job": dump_config(cfg),
        "preprocessing": packed,
        "steps_per_epoch": steps_per_epoch(cfg, train_windows),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
    }


@dataclass
class PreparedRun:
    """Everything the driver resolves before Train starts (checked config, data, MLflow run)."""

    cfg: TrainJobConfig  # with run.name set
    policy_config: object
    preprocessing: object
    datasets: dict
    train_windows: int
    run_id: str | None = None
    tracking_uri: str | None = None

    def loop_config(self) -> dict:
        return loop_config(self.cfg, self.preprocessing, self.train_windows, self.run_id, self.tracking_uri)


def prepare_run(cfg: TrainJobConfig, mlflow_tags: dict | None = None) -> PreparedRun:
    """Preflight (config, data, resources), preprocessing, datasets, MLflow run. Fails before any worker."""
    cfg = with_run_name(cfg)
    manifest, policy_config = preflight(cfg)  # connects to / starts Ray after the cheap checks pass
    preprocessing = build_preprocessing(cfg, manifest, policy_config)
    datasets, train_windows = build_datasets(cfg, preprocessing)
    if train_windows < cfg.scaling.num_workers:
        raise DataError(
            f"data.path = {cfg.data.path!r}: split {cfg.data.train_split!r} yields {train_windows} windows, "
            f"fewer than scaling.num_workers = {cfg.scaling.num_workers}"
        )
    prepared = PreparedRun(cfg, policy_config, preprocessing, datasets, train_windows)
    if cfg.mlflow.enabled:
        run_tags = {**dataset_tags(manifest), **(mlflow_tags or {})}  # the data counts the model card shows
        prepared.run_id, prepared.tracking_uri = _mlflow_run(cfg, policy_config, run_tags)
    return prepared


def build_trainer(cfg: TrainJobConfig, prepared: PreparedRun | None = None, callbacks=None, progress=None):
    """A Ray Train V2 TorchTrainer for this config (constructs only; `fit()` starts the workers).

    Ray Tune trials: `build_trainer(cfg, callbacks=[TuneReportCallback()]).fit()` inside the trial's
    driver function (Train V2 has no `Tuner(trainer)`), or simply `run_training(cfg, callbacks=...)`.
    """
    prepared = prepared or prepare_run(cfg)
    cfg = prepared.cfg
    bundle = cfg.scaling.worker_bundle()
    scaling = ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=bundle
    )
    run = RunConfig(
        name=cfg.run.name,
        storage_path=cfg.storage_path(),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_best,
            checkpoint_score_attribute=cfg.train.select_by,
            checkpoint_score_order="min",
        ),
        worker_runtime_env={"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}},
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**prepared.loop_config(), "progress_queue": progress},
        scaling_config=scaling,
        run_config=run,
        datasets=prepared.datasets,
    )


def _mlflow_run(cfg: TrainJobConfig, policy_config, tags: dict | None = None) -> tuple[str, str]:
    """(run_id, tracking_uri): the run tagged with this run name, created on first launch."""
    uri = configure_mlflow()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = get_or_create_experiment(cfg.mlflow.experiment)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}'", max_results=1
    )
    code = provenance_tags()  # the commit and version that ran it (a resumed run: the latest launch's)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in code.items():
            client.set_tag(run_id, key, value)
    else:
        run_tags = {**(tags or {}), **code, RUN_NAME_TAG: cfg.run.name}
        run_id = client.create_run(experiment_id, run_name=cfg.run.name, tags=run_tags).info.run_id
    _log_params(client, run_id, cfg, policy_config)
    return run_id, uri


def _log_params(client, run_id: str, cfg: TrainJobConfig, policy_config) -> None:
    """Resolved config as params; on resume, changed values (e.g. more epochs) are kept as tags."""
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flatten(dump_config(cfg)).items()}
    params.update({f"policy.{k}": str(v) for k, v in flatten(policy_config.to_dict()).items()})
    logged = client.get_run(run_id).data.params
    new = [Param(k, v[:6000]) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start : start + 100])
    for key, value in params.items():
        if key in logged and logged[key] != value[:6000]:
            client.set_tag(run_id, f"resumed_with.{key}", value[:5000])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train_job.yaml").write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
        (Path(tmp) / "policy_config.json").write_text(json.dumps(policy_config.to_dict(), indent=2))
        client.log_artifacts(run_id, tmp, "config")


def _best_checkpoint(result, score: str = "val_loss"):
    """(checkpoint, metrics) with the lowest `score` (`train.select_by`) among those Ray Train kept."""
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if score in m]
    if not ranked:
        return (result.checkpoint, result.metrics or {}) if result.checkpoint else (None, {})
    return min(ranked, key=lambda pair: pair[1][score])


def _finish_mlflow(cfg: TrainJobConfig, run_id: str, uri: str, result, best, best_metrics) -> str | None:
    """Plots, best metrics, and the best checkpoint as a new registered model version (+ alias)."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as latest:
                history = checkpointing.read_history(latest)
            figure = plots.training_curves(history["steps"], history["epochs"])
            client.log_figure(run_id, figure, "plots/training_curves.png")
        with best.as_directory() as best_dir:
            sample = checkpointing.read_val_sample(best_dir)
            if sample is not None:
                epoch = best_metrics.get("epoch")
                figure = plots.predicted_vs_true(*sample, title=f"Validation, best epoch {epoch}: predicted vs true")
                client.log_figure(run_id, figure, "plots/predicted_vs_true.png")
            shutil.copytree(Path(best_dir) / checkpointing.POLICY_DIR, tmp / "model" / checkpointing.POLICY_DIR)
        safety_note = _calibrate_safety(cfg, tmp / "model" / checkpointing.POLICY_DIR)
        summary = {f"best_{k}": float(v) for k, v in best_metrics.items() if isinstance(v, (int, float))}
        client.log_batch(run_id, metrics=_metric_list(summary))
        if cfg.mlflow.registered_model:
            evaluation = {k: float(v) for k, v in best_metrics.items() if k.startswith("val_")}
            version = _registered_version(client, cfg, run_id, Path(best.path).name)
        if cfg.mlflow.registered_model and version is None:
            version = register_policy(
                tmp / "model",
                run_id,
                name=cfg.mlflow.registered_model,
                alias=cfg.mlflow.alias,
                tags={
                    "train_run": cfg.run.name,
                    "checkpoint": Path(best.path).name,
                    "epoch": str(best_metrics.get("epoch")),
                    "preset": cfg.model.preset,
                    "safety_calibration": safety_note,
                },
            )
            log_version_metrics(cfg.mlflow.registered_model, version, evaluation)
    client.set_terminated(run_id, "FINISHED")
    return version


def _calibrate_safety(cfg: TrainJobConfig, policy_dir: Path) -> str:
    """Novelty statistics + safety thresholds into the version's policy/ (train/safety_calibration.py).

    A failure is logged and the version registered without them (it then serves with novelty off):
    the trained weights are not thrown away over it. Returns a one-line note for the version's tags.
    """
    try:
        calibration = calibrate_policy_dir(policy_dir, cfg.data_path(), cfg.data.train_split, cfg.data.val_split)
    except Exception as exc:  # data, model or numerical errors alike: the note says which
        note = f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); novelty off"
        log.warning("safety calibration %s", note)
        return note
    t = calibration.thresholds
    return f"novelty_slow {t.novelty_slow:.3g}, confidence_slow {t.confidence_slow:.3g}"


def _registered_version(client, cfg: TrainJobConfig, run_id: str, checkpoint_name: str) -> str | None:
    """The version already registered from this run's checkpoint (a re-run of a finished run), if any."""
    for version in client.search_model_versions(f"name = '{cfg.mlflow.registered_model}' and run_id = '{run_id}'"):
        if version.tags.get("checkpoint") == checkpoint_name:
            if cfg.mlflow.alias:
                set_alias(
                    cfg.mlflow.registered_model,
                    cfg.mlflow.alias,
                    version.version,
                    actor="train",
                    reason=f"re-run of finished run {cfg.run.name}: the version its checkpoint registered",
                )
            return str(version.version)
    return None


def _metric_list(values: dict) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in values.items()]


def _completed(cfg: TrainJobConfig):
    """The stored Result when this run name already trained all its epochs (nothing left to resume)."""
    run_dir = Path(cfg.storage_path()) / cfg.run.name
    if "://" in cfg.storage_path() or not run_dir.is_dir():
        return None
    try:
        result = Result.from_path(run_dir)
    except Exception:
        return None
    done = (result.metrics or {}).get("epoch", 0)
    return result if done >= cfg.train.epochs else None


def run_training(
    cfg: TrainJobConfig, callbacks=None, mlflow_tags: dict | None = None, show_progress: bool = False
) -> TrainResult:
    """The whole job on the current Ray cluster (local when none is configured).

    mlflow_tags go on a newly created MLflow run (e.g. `mlflow.parentRunId` for a sweep's trials).
    show_progress prints rank 0's epoch, step, loss and ETA on this process's stderr while it trains.
    """
    prepared = prepare_run(cfg, mlflow_tags)
    cfg, run_id, uri = prepared.cfg, prepared.run_id, prepared.tracking_uri
    result = _completed(cfg)
    if result is not None:
        log.info("run %s already trained %d epochs: nothing to resume", cfg.run.name, cfg.train.epochs)
    else:
        queue = progress_queue() if show_progress else None
        trainer = build_trainer(cfg, prepared, callbacks, progress=queue)
        try:
            with TerminalProgress(queue) if queue is not None else contextlib.nullcontext():
                result = trainer.fit()
        except BaseException:
            if run_id:
                MlflowClient(tracking_uri=uri).set_terminated(run_id, "FAILED")
            raise
    best, best_metrics = _best_checkpoint(result, cfg.train.select_by)
    version = None
    if run_id and best is not None:
        version = _finish_mlflow(cfg, run_id, uri, result, best, best_metrics)
    return TrainResult(
        best_checkpoint_dir=Path(best.path) if best is not None else None,
        metrics=dict(best_metrics),
        run_id=run_id,
        model_version=version,
        run_name=cfg.run.name,
        storage_path=cfg.storage_path(),
        final_metrics=dict(result.metrics or {}),
    )
