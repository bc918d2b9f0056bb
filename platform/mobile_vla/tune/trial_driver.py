"""The Tune trainable: one trial, the sampled values on the base training config, run as one Ray Train
V2 TorchTrainer.

Ray Train V2 has no `Tuner(trainer)`: the trainable is `train_driver(config)`, a small driver that
applies the sampled values to the base TrainJobConfig and runs the training engineer's `run_training`
with a `TuneReportCallback`, so every validated epoch reaches Tune as one result (what ASHA compares).
"""

from __future__ import annotations

import os

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.train.trainer import run_training
from mobile_vla.tune.placement_cleanup import PlacementGroupRecorder
from mobile_vla.tune.sweep_config import apply_params
from mobile_vla.tune.trials import SWEEP_TAG, TRIAL_TAG


def train_driver(config: dict, *, base: dict, sweep: dict) -> None:
    """One trial.

    Args:
        config: the values Tune sampled for this trial, by dotted TrainJobConfig key.
        base: the base TrainJobConfig, dumped.
        sweep: what every trial shares: env (MLflow store, platform home), name, keys (the searched
            keys), parent_run_id, experiment, train_storage.
    """
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
    callbacks = [TuneReportCallback(), PlacementGroupRecorder(sweep["name"], trial_id)]
    run_training(cfg, callbacks=callbacks, mlflow_tags=tags)
