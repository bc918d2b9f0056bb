"""A Ray Tune sweep of training runs: one `TorchTrainer` per trial, ASHA early stopping, MLflow parent run.

    result = run_sweep(load_tune_config("jobs/configs/tune_small.yaml"))
    result.best.trial_id, result.model_version        # registered as models:/mobile-vla-policy@challenger

Ray Train V2 has no `Tuner(trainer)`: the Tune trainable is `train_driver(config)`, a small driver that
applies the sampled values to the base TrainJobConfig and runs the training engineer's `run_training`
with a `TuneReportCallback`, so every validated epoch reaches Tune as one result (what ASHA compares).
The driver reserves only `tune.driver_cpus`; its Train workers reserve their own bundles, and the number
of trials running at once follows from what the cluster holds (`concurrency`).

MLflow: the sweep is one parent run (search space, settings, summary table and plot); each trial is a
child run (`mlflow.parentRunId`) holding its curves and plots. ASHA kills a stopped trial's driver, so
the sweep marks those child runs KILLED with status `early-stopped` afterwards. The best trial's best
checkpoint becomes a new version of the registered model with the alias (`challenger`).
Re-running with the same run.name resumes the sweep: unfinished trials continue from their checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobile_vla.config import dump_config, flatten
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.tune.sweep_config import TuneJobConfig, apply_params, check_search_space, load_base_train_config

log = logging.getLogger(__name__)

SWEEP_TAG = "mobile_vla.sweep"
TRIAL_TAG = "mobile_vla.trial_id"
STATUS_TAG = "mobile_vla.tune.status"
CHECKPOINT_TAG = "mobile_vla.best_checkpoint"
COMPLETED, STOPPED, FAILED = "completed", "early-stopped", "failed"


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]  # the sampled values, by dotted TrainJobConfig key
    status: str  # completed | early-stopped | failed
    epochs: int  # validated epochs reported to Tune
    planned_epochs: int
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, the metric, val_mae, train_loss
    best: dict = field(default_factory=dict)  # metrics of the best epoch (by tune.metric / tune.mode)
    checkpoint: str | None = None  # that epoch's checkpoint folder (Train storage)
    run_id: str | None = None  # the child MLflow run
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    model_version: str | None = None
    concurrency: int = 1
    ensemble_version: str | None = None
    seconds: float = 0.0

    def ranked(self, metric: str, mode: str) -> list[TrialSummary]:
        """Trials with a checkpoint, best first."""
        usable = [t for t in self.trials if t.checkpoint and metric in t.best]
        return sorted(usable, key=lambda t: t.best[metric] if mode == "min" else -t.best[metric])


# --- resources ----------------------------------------------------------------------------------


def trial_bundle(cfg: TuneJobConfig, base) -> dict[str, float]:
    """What one running trial holds: its driver plus its Train workers."""
    worker = base.scaling.worker_bundle()
    bundle = {key: value * base.scaling.num_workers for key, value in worker.items()}
    bundle["CPU"] = bundle.get("CPU", 0.0) + cfg.tune.driver_cpus
    return bundle


def concurrency(cfg: TuneJobConfig, base, cluster: dict[str, float]) -> int:
    """Trials at once: what the cluster holds after one CPU is left to the Ray Data pipelines, capped by
    tune.max_concurrent_trials and the trial count. Raises ResourceError when not even one fits.
    """
    from mobile_vla.errors import ResourceError

    need = trial_bundle(cfg, base)
    room = {key: cluster.get(key, 0.0) - (1.0 if key == "CPU" else 0.0) for key in need}
    fits = min((math.floor(room[key] / value + 1e-9) for key, value in need.items() if value > 0), default=1)
    if fits < 1:
        shown = ", ".join(f"{k}: {v:g}" for k, v in sorted(need.items()))
        have = ", ".join(f"{k}: {cluster.get(k, 0):g}" for k in sorted(need))
        raise ResourceError(
            f"one trial needs {{{shown}}} plus 1 CPU for data loading; the cluster has {{{have}}} "
            "(lower scaling.num_workers / resources_per_worker in the training preset, or tune.driver_cpus)"
        )
    limit = cfg.tune.max_concurrent_trials or fits
    return max(1, min(fits, limit, total_trials(cfg)))


DRIVER_MEMORY = 512 * 1024**2  # bytes of Ray's logical memory per trial driver (it imports torch, holds datasets)


def driver_resources(cfg: TuneJobConfig) -> dict[str, float]:
    """The trial driver's Tune bundle; memory keeps it non-empty when driver_cpus is 0 (Tune refuses an
    all-zero bundle), so a 2-CPU machine can run one trial with one worker and one CPU for data loading.
    """
    return {"CPU": cfg.tune.driver_cpus, "memory": DRIVER_MEMORY}


def total_trials(cfg: TuneJobConfig) -> int:
    grid = 1
    for dimension in cfg.search_space.values():
        if dimension.rule == "grid":
            grid *= len(dimension.grid)
    return cfg.tune.num_samples * grid


# --- the trial ----------------------------------------------------------------------------------


def train_driver(config: dict, *, base: dict, sweep: dict) -> None:
    """One trial: the sampled values on the base training config, run as one Ray Train V2 TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mobile_vla.train.job_config import TrainJobConfig
    from mobile_vla.train.trainer import run_training

    # the sweep's MLflow store, whatever environment this trial's Ray worker process was started with
    os.environ.update(sweep["env"])
    trial_id = tune.get_context().get_trial_id()
    params = {key: config[key] for key in sweep["keys"]}
    cfg = apply_params(TrainJobConfig.model_validate(base), params)
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"{sweep['name']}-{trial_id}"  # stable per trial: a resumed sweep resumes its runs
    cfg.run.storage_path = sweep["train_storage"]
    cfg.mlflow.enabled = True
    cfg.mlflow.experiment = sweep["experiment"]
    cfg.mlflow.registered_model = None  # only the sweep's best trial is registered, by the sweep
    tags = {"mlflow.parentRunId": sweep["parent_run_id"], SWEEP_TAG: sweep["name"], TRIAL_TAG: trial_id}
    callbacks = [TuneReportCallback(), placement_group_recorder(sweep["name"], trial_id)]
    run_training(cfg, callbacks=callbacks, mlflow_tags=tags)


# --- freeing a stopped trial's workers -------------------------------------------------------------
#
# ASHA stops a trial by ending its driver; the Train controller it owns dies with it, but the workers'
# placement group outlives the controller. Ray Train's own cleaner finds such groups through the state
# API, which needs the dashboard; on a cluster without one (`include_dashboard=False`, e.g. tests) the
# CPUs stay reserved and later trials wait forever. So each trial's controller records its workers'
# placement group in the GCS key-value store, and the sweep removes the groups of trials that ended
# early once their controller is gone. Removing a group Ray already removed is a no-op.

KV_NAMESPACE = "mobile_vla.tune"


def _kv_prefix(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}/{trial_id}/"


def placement_group_recorder(sweep_name: str, trial_id: str):
    """A Ray Train callback (runs in the controller) recording each worker group's placement group.

    RunConfig.callbacks passes non-UserCallback entries straight to the controller: Ray's documented
    room for workarounds built on its internal callbacks.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class PlacementGroupRecorder(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            import ray
            from ray.experimental.internal_kv import _internal_kv_put

            try:
                group = worker_group.get_worker_group_state().placement_group_handle.placement_group
                controller = ray.get_runtime_context().get_actor_id() or ""
                _internal_kv_put(
                    _kv_prefix(sweep_name, trial_id) + group.id.hex(), controller.encode(), namespace=KV_NAMESPACE
                )
            except Exception as exc:  # bookkeeping must never fail a training run
                log.warning("could not record the worker placement group of trial %s: %s", trial_id, exc)

    return PlacementGroupRecorder()


def release_trial_resources(sweep_name: str, trial_id: str, wait_s: float = 0.0) -> list[str]:
    """Removes the recorded placement groups of a trial whose Train controller is dead; returns their ids
    (those whose controller still lives are left for the next call).
    """
    import ray
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    prefix = _kv_prefix(sweep_name, trial_id)
    removed = []
    deadline = time.monotonic() + wait_s
    for key in _internal_kv_list(prefix, namespace=KV_NAMESPACE):
        key = key.decode() if isinstance(key, bytes) else key
        controller = (_internal_kv_get(key, namespace=KV_NAMESPACE) or b"").decode()
        while controller and _actor_alive(controller) and time.monotonic() < deadline:
            time.sleep(0.5)
        if controller and _actor_alive(controller):
            continue
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(key[len(prefix) :])))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(group.id.hex())
        _internal_kv_del(key, namespace=KV_NAMESPACE)
    return removed


def _actor_alive(actor_id: str) -> bool:
    import ray._private.state

    info = ray._private.state.actors(actor_id=actor_id)  # the GCS actor table: no dashboard needed
    return bool(info) and info.get("State") != "DEAD"


def make_release_callback(sweep_name: str):
    """A Tune callback freeing the workers of trials that ended early (stopped by ASHA, or failed)."""
    from ray.tune import Callback

    class ReleaseEndedTrials(Callback):
        def __init__(self) -> None:
            self.pending: set[str] = set()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.pending.add(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.pending.add(trial.trial_id)

        def on_step_begin(self, iteration, trials, **info) -> None:
            for trial_id in list(self.pending):
                try:
                    freed = release_trial_resources(sweep_name, trial_id)
                except Exception as exc:
                    log.warning("could not free the workers of trial %s: %s", trial_id, exc)
                    self.pending.discard(trial_id)
                    continue
                if freed:
                    log.info("trial %s ended early: freed its workers' placement group(s) %s", trial_id, freed)
                if not _recorded(sweep_name, trial_id):
                    self.pending.discard(trial_id)

        def on_experiment_end(self, trials, **info) -> None:
            for trial_id in list(self.pending):
                release_trial_resources(sweep_name, trial_id, wait_s=30.0)

    return ReleaseEndedTrials()


def _recorded(sweep_name: str, trial_id: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_list

    return bool(_internal_kv_list(_kv_prefix(sweep_name, trial_id), namespace=KV_NAMESPACE))


# --- progress -----------------------------------------------------------------------------------


def make_progress_callback(cfg: TuneJobConfig, planned_epochs: int, console=None):
    """A Tune callback drawing one rich progress bar for the whole sweep (epochs done of epochs planned)."""
    from ray.tune import Callback
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    metric, mode = cfg.tune.metric, cfg.tune.mode

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.console = console
            self.progress = None  # made in setup(): Tune pickles its callbacks with the experiment state
            self.task = None
            self.epochs: dict[str, int] = {}
            self.finished: dict[str, str] = {}
            self.best: tuple[float, str] | None = None

        def __getstate__(self) -> dict:
            return {**self.__dict__, "console": None, "progress": None, "task": None}

        def setup(self, **info) -> None:
            self.progress = Progress(
                TextColumn("[bold]sweep[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epochs"),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=self.console or Console(stderr=True),
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=total_trials(cfg) * planned_epochs)

        def _describe(self) -> None:
            running = len([t for t in self.epochs if t not in self.finished])
            stopped = sum(1 for s in self.finished.values() if s == STOPPED)
            done = sum(1 for s in self.finished.values() if s == COMPLETED)
            failed = sum(1 for s in self.finished.values() if s == FAILED)
            best = f" · best {metric} {self.best[0]:.4g} ({self.best[1]})" if self.best else ""
            text = f"{running} running, {done} done, {stopped} stopped early" + (f", {failed} failed" if failed else "")
            self.progress.update(self.task, description=text + best)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.epochs[trial.trial_id] = self.epochs.get(trial.trial_id, 0) + 1
            value = result.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                better = self.best is None or (value < self.best[0] if mode == "min" else value > self.best[0])
                if better:
                    self.best = (float(value), trial.trial_id)
            self.progress.advance(self.task, 1)
            self._describe()

        def _finish(self, trial, status: str) -> None:
            done = self.epochs.get(trial.trial_id, 0)
            if status == COMPLETED and done < planned_epochs:
                status = STOPPED
            self.finished[trial.trial_id] = status
            # epochs a stopped or failed trial will never run leave the plan
            total = self.progress.tasks[0].total - max(0, planned_epochs - done)
            self.progress.update(self.task, total=total)
            self._describe()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._finish(trial, COMPLETED)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._finish(trial, FAILED)

        def on_experiment_end(self, trials, **info) -> None:
            if self.progress is not None:
                self.progress.stop()

    return SweepProgress()


# --- the sweep ----------------------------------------------------------------------------------


def _scheduler(cfg: TuneJobConfig, planned_epochs: int):
    if cfg.tune.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past the last epoch: a trial that trains all its epochs ends by returning (after its
    # MLflow run is finished), never by a STOP at the final report
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=planned_epochs + 1,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def _search_algorithm(cfg: TuneJobConfig, running: int):
    """The search algorithm, limited to `running` trials at once.

    TuneConfig.max_concurrent_trials only wraps a `Searcher` (Optuna); a BasicVariantGenerator passed in
    ignores it silently (then every trial starts at once), so it gets the limit itself.
    """
    points = [dict(p) for p in cfg.tune.points_to_evaluate]
    if cfg.tune.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(
            points_to_evaluate=points or None, random_state=cfg.tune.seed, max_concurrent=running
        )
    from ray.tune.search.optuna import OptunaSearch

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError(
            "tune.search = 'optuna': optuna is not installed (pip install optuna, or use 'random')"
        ) from None
    return OptunaSearch(points_to_evaluate=points or None, seed=cfg.tune.seed)


def _parent_run(cfg: TuneJobConfig, name: str, base) -> tuple[str, Any]:
    """(run_id, client): the sweep's parent run, the same one again when a sweep name is reused."""
    from mlflow import MlflowClient

    from mobile_vla.tracking import configure_mlflow, get_or_create_experiment

    uri = configure_mlflow()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = get_or_create_experiment(cfg.mlflow.experiment)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{TRIAL_TAG}` = 'parent'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, client
    run_id = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name, TRIAL_TAG: "parent"}).info.run_id
    params = {f"tune.{k}": v for k, v in flatten(dump_config(cfg.tune)).items()}
    params.update({f"search_space.{k}": json.dumps({d.rule: d.values}) for k, d in cfg.search_space.items()})
    params.update({f"base.{k}": v for k, v in flatten(dump_config(base)).items()})
    from mlflow.entities import Param

    rows = [Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000]) for k, v in params.items()]
    for start in range(0, len(rows), 100):
        client.log_batch(run_id, params=rows[start : start + 100])
    return run_id, client


def run_sweep(cfg: TuneJobConfig, *, config_dir: Path | None = None, console=None) -> SweepResult:
    """The whole sweep on the current Ray cluster (local when none is configured)."""
    import ray
    from ray import tune

    from mobile_vla.train.preflight import check_data, check_model
    from mobile_vla.train.trainer import ensure_ray

    started = time.perf_counter()
    base = load_base_train_config(cfg, config_dir)
    check_model(base)
    check_data(base)
    check_search_space(cfg, base)
    name = cfg.run.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_ray()
    running = concurrency(cfg, base, ray.cluster_resources())
    parent_run_id, client = _parent_run(cfg, name, base)

    from mobile_vla.config import platform_home
    from mobile_vla.tracking import configure_mlflow

    storage = cfg.storage_path()
    sweep = {
        "env": {"MLFLOW_TRACKING_URI": configure_mlflow(), "MOBILE_VLA_HOME": str(platform_home())},
        "name": name,
        "keys": sorted(cfg.search_space),
        "parent_run_id": parent_run_id,
        "experiment": cfg.mlflow.experiment,
        "train_storage": f"{storage.rstrip('/')}/{name}/train_runs",
    }
    trainable = tune.with_resources(
        tune.with_parameters(train_driver, base=dump_config(base), sweep=sweep), driver_resources(cfg)
    )
    planned = base.train.epochs
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        verbose=0,
        callbacks=[make_progress_callback(cfg, planned, console), make_release_callback(name)],
        failure_config=tune.FailureConfig(max_failures=0),
    )
    experiment_path = f"{storage.rstrip('/')}/{name}"
    try:
        if tune.Tuner.can_restore(experiment_path):
            log.info("resuming sweep %s from %s", name, experiment_path)
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: d.to_tune() for key, d in cfg.search_space.items()},
                tune_config=tune.TuneConfig(
                    metric=cfg.tune.metric,
                    mode=cfg.tune.mode,
                    num_samples=cfg.tune.num_samples,
                    scheduler=_scheduler(cfg, planned),
                    search_alg=_search_algorithm(cfg, running),
                    max_concurrent_trials=running if cfg.tune.search == "optuna" else None,
                ),
                run_config=run_config,
            )
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise

    trials = summarise(grid, cfg, sweep, planned, client)
    result = SweepResult(name=name, parent_run_id=parent_run_id, trials=trials, best=None, concurrency=running)
    ranked = result.ranked(cfg.tune.metric, cfg.tune.mode)
    result.best = ranked[0] if ranked else None
    log_summary(client, result, cfg)
    if result.best is not None and cfg.mlflow.registered_model:
        result.model_version = register_trial(client, result.best, cfg, name)
        client.set_tag(parent_run_id, "mobile_vla.model_version", result.model_version)
    if cfg.ensemble.members and len(ranked) >= 2:
        from mobile_vla.tune.ensemble_build import register_sweep_ensemble

        result.ensemble_version = register_sweep_ensemble(result, cfg, base)
    result.seconds = time.perf_counter() - started
    client.log_metric(parent_run_id, "sweep_seconds", result.seconds)
    failed = [t for t in trials if t.status == FAILED]
    client.set_terminated(parent_run_id, "FINISHED" if result.best is not None else "FAILED")
    if result.best is None:
        reasons = "; ".join(f"{t.trial_id}: {t.error}" for t in failed[:3])
        raise MobileVLAError(f"sweep {name}: no trial produced a checkpoint ({reasons or 'no results'})")
    return result


# --- after the sweep ----------------------------------------------------------------------------


def _checkpoint_exists(path: str | None) -> bool:
    if not path:
        return False
    return "://" in path or Path(path).is_dir()


def summarise(grid, cfg: TuneJobConfig, sweep: dict, planned: int, client) -> list[TrialSummary]:
    """One TrialSummary per trial from Tune's results; tags each child run with its outcome."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
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
        frame = result.metrics_dataframe
        rows = [] if frame is None or frame.empty else frame.to_dict("records")
        trial_id = str(
            (result.metrics or {}).get("trial_id")
            or (rows[-1].get("trial_id") if rows else "")
            or Path(result.path or "?").name
        )
        history = [
            {
                k: row.get(k)
                for k in ("epoch", metric, "val_loss", "val_mae", "train_loss", "checkpoint_path")
                if k in row
            }
            for row in rows
            if metric in row and row[metric] == row[metric]
        ]
        with_checkpoint = [h for h in history if _checkpoint_exists(h.get("checkpoint_path"))]
        sign = 1.0 if mode == "min" else -1.0
        best_row = min(with_checkpoint, key=lambda h: sign * h[metric]) if with_checkpoint else None
        status = FAILED if result.error else (COMPLETED if len(history) >= planned else STOPPED)
        summary = TrialSummary(
            trial_id=trial_id,
            params={k: (result.config or {}).get(k) for k in sweep["keys"]},
            status=status,
            epochs=len(history),
            planned_epochs=planned,
            history=[{k: v for k, v in h.items() if k != "checkpoint_path"} for h in history],
            best={k: float(v) for k, v in (best_row or {}).items() if isinstance(v, (int, float))},
            checkpoint=best_row["checkpoint_path"] if best_row else None,
            error=f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:300]}" if result.error else None,
        )
        run = runs.get(trial_id)
        if run is not None:
            summary.run_id = run.info.run_id
            client.set_tag(run.info.run_id, STATUS_TAG, status)
            if summary.checkpoint:
                client.set_tag(run.info.run_id, CHECKPOINT_TAG, summary.checkpoint)
            ended_by_sweep = status == STOPPED and run.info.status == "FAILED"  # fit() raised as ASHA ended it
            if run.info.status == "RUNNING" or ended_by_sweep:
                # ASHA (also at a rung that is the last epoch) or a failure ended this trial's driver before
                # it closed its run: its best epoch's metrics (as run_training logs them) and its end state
                for key, value in summary.best.items():
                    client.log_metric(run.info.run_id, f"best_{key}", value)
                client.set_terminated(run.info.run_id, {COMPLETED: "FINISHED", STOPPED: "KILLED"}.get(status, "FAILED"))
        trials.append(summary)
    return trials


def summary_rows(trials: list[TrialSummary], metric: str) -> list[dict]:
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
    import csv
    import io

    from mobile_vla.tune import plots

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
    """Copies a Train checkpoint's policy/ folder (local path or storage URI) into `into`/policy."""
    from mobile_vla.train.checkpointing import POLICY_DIR

    target = into / POLICY_DIR
    if "://" not in checkpoint:
        source = Path(checkpoint) / POLICY_DIR
        if not source.is_dir():
            raise MobileVLAError(f"{checkpoint}: checkpoint has no {POLICY_DIR}/ folder")
        shutil.copytree(source, target)
        return target
    import pyarrow.fs
    from ray.train import Checkpoint

    filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
    with Checkpoint(path, filesystem=filesystem).as_directory() as local:
        shutil.copytree(Path(local) / POLICY_DIR, target)
    return target


def register_trial(client, trial: TrialSummary, cfg: TuneJobConfig, sweep_name: str) -> str:
    """The trial's best checkpoint as a new version of the registered model, with the alias."""
    from mobile_vla.tracking import log_version_metrics, register_policy

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
