"""A real Ray Train run with the issue-15 recipe options on the tiny preset (the shared options run of
tests/train/conftest.py): the options reach the workers, the model is saved with them, and the checkpoint
kept and registered is the one with the lowest k = 0 validation MAE."""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL = "mobile-vla-policy"

pytestmark = pytest.mark.slow  # one real Ray Train run (shared with the aux and measured-state tests)


def test_recipe_run_selects_by_the_executed_step_and_saves_the_options(options_home, tiny_dataset):
    from mlflow import MlflowClient

    from mobile_vla.policy import load_policy
    from mobile_vla.tracking import configure_mlflow
    from mobile_vla.train.checkpointing import read_history
    from mobile_vla.train.trainer import steps_per_epoch
    from mobile_vla.train.windows import count_windows

    cfg, result = options_home.cfg, options_home.result
    assert (cfg.train.select_by, cfg.data.stride, cfg.loss.first_step_weight) == ("val_mae_now", 4, 5)

    # the stride reached the pipeline: non-overlapping windows set the number of optimiser steps
    windows = count_windows(tiny_dataset, "train", window=cfg.data.window, stride=4)
    assert windows < count_windows(tiny_dataset, "train", window=cfg.data.window)
    assert result.final_metrics["step"] == cfg.train.epochs * steps_per_epoch(cfg, windows)

    # val_mae_now is logged every epoch, and the kept checkpoint is the epoch where it is lowest
    epochs = read_history(Path(result.storage_path) / cfg.run.name / f"checkpoint_epoch_{cfg.train.epochs:04d}")[
        "epochs"
    ]
    scores = [e["val_mae_now"] for e in epochs]
    assert len(scores) == 3 and all(s > 0 for s in scores)
    assert result.metrics["val_mae_now"] == pytest.approx(min(scores))
    assert result.metrics["epoch"] == 1 + scores.index(min(scores))

    # the options travel with the model: the checkpoint and the registered version rebuild them
    model, _ = load_policy(result.best_checkpoint_dir / "policy")
    config = model.config
    assert (config.image_size, config.kosmos.patch_size, config.clip.patch_size) == (112, 16, 16)
    assert (config.state_dropout, config.confidence_steps) == (0.5, 1)
    configure_mlflow()
    version = MlflowClient().get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == result.model_version
    assert float(version.tags["metric.val_mae_now"]) == pytest.approx(min(scores), rel=1e-4)
