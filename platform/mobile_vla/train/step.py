"""One training step, shared by Ray Train's `train_loop_per_worker` and the online update's fine-tune.

    step = TrainStep(model, optimizer, device=device, scheduler=scheduler, grad_clip=1.0, accumulate=2)
    for batch, is_last in with_last_flag(batches):
        result = step(batch, last=is_last)     # forward + backward; an optimiser step every 2 batches
        if result.stepped: ...                 # result.loss: this micro-batch's loss

A step is: forward under autocast (bf16 when `precision` says so), `policy_loss`, backward of the loss
divided by `accumulate`, and on the micro-batch that completes a group (or the last one of the data) the
gradient all-reduce, clipping, optimiser and LR scheduler step, and zeroing of the gradients. The
other micro-batches skip the all-reduce (DDP `no_sync`, FSDP `set_requires_gradient_sync(False)`).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from mobile_vla.policy.losses import AUX_TERMS, policy_loss
from mobile_vla.train.distributed import is_distributed
from mobile_vla.train.evaluation import autocast_context, batch_to_device, model_inputs


class StepResult(NamedTuple):
    """The outcome of one micro-batch through `TrainStep`."""

    loss: float  # this micro-batch's policy loss (not divided by accumulate)
    stepped: bool  # True when this micro-batch ended with an optimiser step
    group_size: int  # micro-batches in the group just stepped (0 when not stepped)
    aux: dict[str, float] | None = None  # the auxiliary loss terms (AUX_TERMS) when loss_weights trains them


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine annealing down to min_ratio."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings' 1-D parameters (the usual AdamW practice)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@contextlib.contextmanager
def gradient_sync(model, strategy: str, enabled: bool):
    """Skips the gradient all-reduce of a distributed model while `enabled` is False (accumulation)."""
    if enabled or not is_distributed():
        yield
    elif strategy == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


class TrainStep:
    """Forward, loss, backward and (every `accumulate` micro-batches) the optimiser step of one model.

    Args:
        model: the policy, possibly wrapped by DDP or FSDP (`strategy` says which).
        optimizer: its optimiser.
        device: where batches go (they are moved there when they are not already).
        scheduler: an LR scheduler stepped with the optimiser, or None.
        grad_clip: max global gradient norm, or None for no clipping.
        accumulate: micro-batches per optimiser step.
        precision: "bf16", "fp32" or "auto" (bf16 on CUDA); see `autocast_context`.
        strategy: "ddp" or "fsdp" (how gradient sync is skipped between optimiser steps).
        loss_weights: keyword arguments of `policy_loss` (`nll_weight`, `first_step_weight`); None = its defaults.
    """

    def __init__(
        self,
        model,
        optimizer,
        *,
        device,
        scheduler=None,
        grad_clip: float | None = None,
        accumulate: int = 1,
        precision: str = "fp32",
        strategy: str = "ddp",
        loss_weights: dict[str, float] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.accumulate = accumulate
        self.precision = precision
        self.strategy = strategy
        self.loss_weights = dict(loss_weights or {})
        self.micro_batches = 0  # since the last optimiser step

    def __call__(self, batch: dict, last: bool = False) -> StepResult:
        """One micro-batch; `last` forces the optimiser step (the final partial group of an epoch)."""
        self.micro_batches += 1
        stepping = last or self.micro_batches >= self.accumulate
        batch = batch_to_device(batch, self.device)
        with gradient_sync(self.model, self.strategy, stepping), autocast_context(self.precision, self.device):
            terms = policy_loss(self.model(model_inputs(batch)), batch, **self.loss_weights)
            loss = terms["loss"]
            (loss / self.accumulate).backward()
        aux = {key: float(terms[key].detach()) for key in AUX_TERMS} if AUX_TERMS[0] in terms else None
        if not stepping:
            return StepResult(float(loss.detach()), False, 0, aux)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        group_size, self.micro_batches = self.micro_batches, 0
        return StepResult(float(loss.detach()), True, group_size, aux)
