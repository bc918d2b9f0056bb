"""Training checkpoints: one folder per validated epoch, everything needed to resume or to ship the model.

    checkpoint_000004/
      policy/                 save_policy(): weights, resolved PolicyConfig, preprocessing (= the model version)
      train_state.pt          optimiser, LR scheduler, epoch and step counters
      job_config.json         the resolved TrainJobConfig of the run that wrote it
      metrics.json            this epoch's training and validation metrics
      history.json            per-step and per-epoch metrics so far (training curves)
      val_predictions.npz     a sample of de-normalised validation predictions and targets [N, 3]

`policy/` is exactly what `register_policy` publishes, so the registered model and the checkpoint can
never disagree. Ray Train keeps the best `train.keep_best` of these by `train.select_by` (validation
loss, or the executed step's validation MAE `val_mae_now`), and always the latest, which is what a
resumed or restarted run picks up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mobile_vla.policy.checkpoint import POLICY_DIR, save_policy

TRAIN_STATE = "train_state.pt"
JOB_CONFIG = "job_config.json"
METRICS = "metrics.json"
HISTORY = "history.json"
VAL_PREDICTIONS = "val_predictions.npz"


@dataclass
class Progress:
    """Where training stands: epochs done, optimiser steps done, and the curves so far."""

    epoch: int = 0
    step: int = 0
    steps: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} every log_every_n_steps
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "step", "train_loss", "val_loss", ...}


def pack_folder(folder: str | Path) -> dict[str, bytes]:
    """A small folder (preprocessing + tokenizer files) as {relative path: bytes}, to ship to workers."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack_folder(files: dict[str, bytes], folder: str | Path) -> Path:
    """Writes a `pack_folder` result under `folder`; returns the folder."""
    folder = Path(folder)
    for rel, data in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def write_checkpoint(
    folder: str | Path,
    *,
    model,
    preprocessing,
    optimizer_state: dict,
    scheduler_state: dict,
    progress: Progress,
    job_config: dict,
    metrics: dict,
    val_sample: tuple | None = None,
) -> Path:
    """Writes one checkpoint folder (rank 0 only); `model` is the unwrapped policy holding full weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_policy(folder / POLICY_DIR, model, preprocessing)
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler_state, "epoch": progress.epoch, "step": progress.step},
        folder / TRAIN_STATE,
    )
    (folder / JOB_CONFIG).write_text(json.dumps(job_config, indent=2))
    (folder / METRICS).write_text(json.dumps(metrics, indent=2))
    (folder / HISTORY).write_text(json.dumps({"steps": progress.steps, "epochs": progress.epochs}))
    if val_sample is not None:
        pred, true = val_sample
        np.savez_compressed(folder / VAL_PREDICTIONS, pred=pred, true=true)
    return folder


def read_train_state(folder: str | Path) -> tuple[dict, Progress]:
    """(optimiser/scheduler states, Progress) of a checkpoint folder."""
    folder = Path(folder)
    state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
    history = json.loads((folder / HISTORY).read_text())
    progress = Progress(epoch=state["epoch"], step=state["step"], steps=history["steps"], epochs=history["epochs"])
    return state, progress


def read_history(folder: str | Path) -> dict:
    """{"steps": [...], "epochs": [...]}: the training curves so far."""
    return json.loads((Path(folder) / HISTORY).read_text())


def read_val_sample(folder: str | Path):
    """(pred [N,3], true [N,3]) or None."""
    path = Path(folder) / VAL_PREDICTIONS
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["pred"], data["true"]
