"""Fine-tuning a policy on fleet feedback: the weighted feedback windows, the replay windows, the loop.

    train = ConcatDataset([WeightedWindows(feedback_dir, "train", pre, augment=True, seed=0),
                           PlainWindows(data_dir, "train", pre, augment=True, seed=0, limit=64)])
    losses = finetune(model, train, FinetuneConfig(steps=200))
    feedback_metrics(model, WeightedWindows(feedback_dir, "val", pre, False, 0), pre, "auto")

Each step is `train.step.TrainStep` (the one Ray Train's loop runs) and each measurement is
`train.evaluation.evaluate_windows`, so the online update learns and scores exactly like training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from pydantic import Field
from rich.progress import Progress

from mobile_vla.config import StrictModel
from mobile_vla.errors import DataError, ResourceError
from mobile_vla.train.evaluation import evaluate_windows, window_batches
from mobile_vla.train.job_config import LossConfig
from mobile_vla.train.step import TrainStep, param_groups, warmup_cosine
from mobile_vla.train.windows import WindowDataset

EVAL_BATCH_SIZE = 8


class FinetuneConfig(StrictModel):
    """How the champion is fine-tuned on the feedback mix (the `finetune:` section of the job config)."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-5, gt=0)  # the peak: linear warm-up to it, then cosine down to lr * min_lr_ratio
    warmup_steps: int = Field(20, ge=0)  # a constant peak kicks the champion out of its minimum (replay error x3)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    trainable: Literal["all", "policy_head"] = "all"  # policy_head: fusion + LSTM + head; backbones frozen
    augment: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every_n_steps: int = Field(10, ge=1)
    loss: LossConfig = Field(default_factory=LossConfig)  # the loss term weights, as training's `loss:` section


class WeightedWindows:
    """Windows of assembled feedback episodes whose `action_mask` [T, K] carries each target step's
    weight: the loss (a mask-weighted mean) then counts a corrected step `weights.corrected` times.
    """

    def __init__(self, folder: Path, split: str, preprocessing, augment: bool, seed: int):
        self.windows = WindowDataset(folder, split, preprocessing, augment=augment, seed=seed)
        self.weights, self.corrected = [], []
        for path in self.windows.index.paths:
            with h5py.File(path, "r") as f:
                if "weight" not in f:
                    raise DataError(f"{path}: weight: missing (not an assembled feedback episode)")
                self.weights.append(f["weight"][()].astype(np.float32))  # [N]
                self.corrected.append((f["corrected"][()] | f["intervention"][()]).astype(np.float32))  # [N]

    def __len__(self) -> int:
        return len(self.windows)

    def target_rows(self, window_id: int) -> tuple[int, np.ndarray]:
        """(episode, frame row [T, K] of each target step, clamped to the episode's last frame)."""
        episode, start = (int(v) for v in self.windows.index.windows[window_id])
        pre = self.windows.index.pre
        rows = start + np.arange(pre.window)[:, None] + np.arange(pre.chunk)[None, :]  # [T, K]
        return episode, np.minimum(rows, len(self.weights[episode]) - 1)

    def __getitem__(self, window_id: int) -> dict:
        sample = self.windows[window_id]
        episode, rows = self.target_rows(window_id)
        sample["action_mask"] = sample["action_mask"] * self.weights[episode][rows]  # [T, K]
        sample["corrected_mask"] = ((sample["action_mask"] > 0) * self.corrected[episode][rows]).astype("float32")
        return sample


class PlainWindows:
    """Original-data windows (weight 1), optionally a fixed random subset of them."""

    def __init__(self, folder: Path, split: str, preprocessing, augment: bool, seed: int, limit: int | None):
        self.windows = WindowDataset(folder, split, preprocessing, augment=augment, seed=seed)
        ids = np.arange(len(self.windows))
        if limit is not None and limit < len(ids):
            ids = np.sort(np.random.default_rng(seed).choice(ids, size=limit, replace=False))
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        sample = self.windows[int(self.ids[i])]
        sample["corrected_mask"] = sample["action_mask"] * 0
        return sample


def finetune_device(choice: str) -> torch.device:
    """The fine-tuning device: CUDA when asked for ("cuda") or visible ("auto"), else the CPU.

    Raises:
        ResourceError: "cuda" was asked for and no CUDA device is visible.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ResourceError("finetune.device = 'cuda' but no CUDA device is visible")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _set_epoch(dataset, epoch: int) -> None:
    """Fresh augmentation draws per pass for every window dataset inside a ConcatDataset."""
    for part in getattr(dataset, "datasets", [dataset]):
        windows = getattr(part, "windows", None)
        if hasattr(windows, "set_epoch"):
            windows.set_epoch(epoch)


def finetune(model, dataset, cfg: FinetuneConfig, log_metric=None) -> list[float]:
    """Weighted fine-tuning of `model` for `cfg.steps` optimiser steps; returns the loss per step.

    Args:
        model: the policy to fine-tune in place (left in eval mode on the fine-tuning device).
        dataset: map-style windows (`WeightedWindows`, `PlainWindows` or a ConcatDataset of them).
        cfg: steps, batch size, optimiser settings, which parameters train, seed and device.
        log_metric: optional `(key, value, step)` callback for the mean loss every log_every_n_steps.
    """
    device = finetune_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    if cfg.trainable == "policy_head":
        for part in (model.kosmos, model.clip):
            for param in part.parameters():
                param.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = TrainStep(
        model,
        optimizer,
        device=device,
        scheduler=scheduler,
        grad_clip=cfg.grad_clip,
        loss_weights=cfg.loss.weights(),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=0,
    )
    losses: list[float] = []
    epoch = 0
    with Progress(transient=True) as progress:
        task = progress.add_task("fine-tuning on feedback", total=cfg.steps)
        while len(losses) < cfg.steps:
            _set_epoch(dataset, epoch)
            for batch in loader:
                losses.append(step(batch).loss)
                if log_metric and len(losses) % cfg.log_every_n_steps == 0:
                    recent = losses[-cfg.log_every_n_steps :]
                    log_metric("finetune.loss", float(sum(recent) / len(recent)), len(losses))
                progress.update(task, advance=1)
                if len(losses) >= cfg.steps:
                    break
            epoch += 1
    model.eval()
    return losses


def feedback_metrics(model, dataset, preprocessing, device: str = "auto") -> dict[str, float]:
    """MAE (m/s, rad/s) of the action to execute now (k = 0) over weighted targets (`feedback_mae`)
    and over corrected ones (`corrected_mae`, NaN when there are none), on windows without augmentation.
    """
    dev = finetune_device(device)
    model.to(dev)
    batches = window_batches(dataset, EVAL_BATCH_SIZE)
    scored = evaluate_windows(model, batches, preprocessing, device=dev, keep_masks=("corrected_mask",))
    return {
        "feedback_mae": scored.metrics(now_only=True)["mae"],
        "corrected_mae": scored.metrics("corrected_mask", now_only=True)["mae"],
    }
