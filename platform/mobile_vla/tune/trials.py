"""What a sweep's trials did, and the MLflow tags that find them again.

    result.best.trial_id, result.best.best["val_loss"], result.best.checkpoint
    result.ranked("val_loss", "min")      # trials with a checkpoint, best first

The tags mark the sweep's runs in MLflow: `SWEEP_TAG` holds the sweep name on the parent, every trial's
child run and the ensemble run; `TRIAL_TAG` holds the trial id ('parent' and 'ensemble' for the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SWEEP_TAG = "mobile_vla.sweep"
TRIAL_TAG = "mobile_vla.trial_id"
STATUS_TAG = "mobile_vla.tune.status"
CHECKPOINT_TAG = "mobile_vla.best_checkpoint"
PARENT_TRIAL = "parent"  # TRIAL_TAG of the sweep's parent run
ENSEMBLE_TRIAL = "ensemble"  # TRIAL_TAG of the run that built the sweep's ensemble
COMPLETED, STOPPED, FAILED = "completed", "early-stopped", "failed"


@dataclass
class TrialSummary:
    """One trial: its sampled values, how it ended, its per-epoch history and its best checkpoint."""

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
    """A finished sweep: every trial, the best one, and the versions it registered."""

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
