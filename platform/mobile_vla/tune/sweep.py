"""A Ray Tune sweep of training runs: one `TorchTrainer` per trial, ASHA early stopping, MLflow parent run.

    result = run_sweep(load_tune_config("jobs/configs/tune_small.yaml"))
    result.best.trial_id, result.model_version        # registered as models:/mobile-vla-policy@challenger

Each trial runs `trial_driver.train_driver` (the sampled values on the base TrainJobConfig, one Ray Train
V2 run). The driver reserves only `tune.driver_cpus`; its Train workers reserve their own bundles, and
the number of trials running at once follows from what the cluster holds (`trial_resources.concurrency`).

MLflow: the sweep is one parent run (search space, settings, summary table and plot); each trial is a
child run (`mlflow.parentRunId`) holding its curves and plots. ASHA kills a stopped trial's driver, so
the sweep marks those child runs KILLED with status `early-stopped` afterwards. The best trial's best
checkpoint becomes a new version of the registered model with the alias (`challenger`).
Re-running with the same run.name resumes the sweep: unfinished trials continue from their checkpoints.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from ray import tune

from mobile_vla.config import dump_config, platform_home
from mobile_vla.errors import MobileVLAError
from mobile_vla.ray_session import ensure_ray
from mobile_vla.tracking import configure_mlflow
from mobile_vla.tracking.job_storage import check_job_storage
from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.train.preflight import check_data, check_model
from mobile_vla.tune.ensemble_build import register_sweep_ensemble
from mobile_vla.tune.placement_cleanup import ReleaseEndedTrials
from mobile_vla.tune.progress import SweepProgress
from mobile_vla.tune.search import build_scheduler, build_search_algorithm
from mobile_vla.tune.sweep_config import TuneJobConfig, check_search_space, load_base_train_config
from mobile_vla.tune.sweep_tracking import log_summary, parent_run, register_trial, summarise
from mobile_vla.tune.trial_driver import train_driver
from mobile_vla.tune.trial_resources import concurrency, driver_resources, total_trials
from mobile_vla.tune.trials import FAILED, SweepResult

log = logging.getLogger(__name__)


def _tuner(cfg: TuneJobConfig, base: TrainJobConfig, sweep: dict, running: int, console) -> tune.Tuner:
    """A new Tuner for the sweep, or the earlier one restored when a sweep of this name was interrupted."""
    storage = cfg.storage_path()
    name = sweep["name"]
    trainable = tune.with_resources(
        tune.with_parameters(train_driver, base=dump_config(base), sweep=sweep), driver_resources(cfg)
    )
    planned = base.train.epochs
    progress = SweepProgress(cfg.tune.metric, cfg.tune.mode, total_trials(cfg), planned, console)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        verbose=0,
        callbacks=[progress, ReleaseEndedTrials(name)],
        failure_config=tune.FailureConfig(max_failures=0),
    )
    experiment_path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment_path):
        log.info("resuming sweep %s from %s", name, experiment_path)
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={key: d.to_tune() for key, d in cfg.search_space.items()},
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=cfg.tune.num_samples,
            scheduler=build_scheduler(cfg, planned),
            search_alg=build_search_algorithm(cfg, running),
            max_concurrent_trials=running if cfg.tune.search == "optuna" else None,
        ),
        run_config=run_config,
    )


def run_sweep(cfg: TuneJobConfig, *, config_dir: Path | None = None, console=None) -> SweepResult:
    """The whole sweep on the current Ray cluster (local when none is configured).

    Args:
        cfg: the tune config.
        config_dir: the tune config's folder (train.config may be relative to it).
        console: a rich console for the progress bar (None: stderr).

    Returns:
        The trials, the best one, and the versions registered (best trial, ensemble).

    Raises:
        MobileVLAError: no trial produced a checkpoint (ConfigError/ResourceError before any trial runs).
    """
    started = time.perf_counter()
    check_job_storage([cfg.run.storage_place()])  # a Ray job's results must outlive it
    base = load_base_train_config(cfg, config_dir)
    check_model(base)
    check_data(base)
    check_search_space(cfg, base)
    name = cfg.run.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    ensure_ray()
    running = concurrency(cfg, base, ray.cluster_resources())
    parent_run_id, client = parent_run(cfg, name, base)
    sweep = {
        "env": {"MLFLOW_TRACKING_URI": configure_mlflow(), "MOBILE_VLA_HOME": str(platform_home())},
        "name": name,
        "keys": sorted(cfg.search_space),
        "parent_run_id": parent_run_id,
        "experiment": cfg.mlflow.experiment,
        "train_storage": f"{cfg.storage_path().rstrip('/')}/{name}/train_runs",
    }
    try:
        grid = _tuner(cfg, base, sweep, running, console).fit()
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise

    trials = summarise(grid, cfg, sweep, base.train.epochs, client)
    result = SweepResult(name=name, parent_run_id=parent_run_id, trials=trials, best=None, concurrency=running)
    ranked = result.ranked(cfg.tune.metric, cfg.tune.mode)
    result.best = ranked[0] if ranked else None
    log_summary(client, result, cfg)
    if result.best is not None and cfg.mlflow.registered_model:
        result.model_version = register_trial(client, result.best, cfg, name)
        client.set_tag(parent_run_id, "mobile_vla.model_version", result.model_version)
    if cfg.ensemble.members and len(ranked) >= 2:
        result.ensemble_version = register_sweep_ensemble(result, cfg, base)
    result.seconds = time.perf_counter() - started
    client.log_metric(parent_run_id, "sweep_seconds", result.seconds)
    client.set_terminated(parent_run_id, "FINISHED" if result.best is not None else "FAILED")
    if result.best is None:
        failed = [t for t in trials if t.status == FAILED]
        reasons = "; ".join(f"{t.trial_id}: {t.error}" for t in failed[:3])
        raise MobileVLAError(f"sweep {name}: no trial produced a checkpoint ({reasons or 'no results'})")
    return result
