"""THE window evaluation: a model over batches of windows -> de-normalised predictions, targets, masks.

    scored = evaluate_windows(model, window_batches(dataset, 8), preprocessing)
    scored.metrics()                                      # MAE/RMSE/R² per axis and overall
    scored.metrics(mask="corrected_mask", now_only=True)  # k = 0 only, where corrected_mask > 0

Training's validation, the online update, the ensemble quality report and the offline replay scores
(`WindowPredictions` built from replayed episodes) all score through `WindowPredictions`, so every
MAE in the platform means the same thing: the mean absolute error in m/s and rad/s over the
(frame, chunk step, axis) entries whose weight (`action_mask` x `frame_mask`) is positive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from mobile_vla.policy.losses import AUX_TERMS, action_metrics, policy_loss

INPUT_KEYS = (
    "images",
    "state",
    "frame_mask",
    "clip_input_ids",
    "kosmos_input_ids",
    "kosmos_attention_mask",
    "kosmos_image_embeds_position_mask",
)


def model_inputs(batch: dict) -> dict:
    """The keys of a window batch the policy reads (targets and masks stay out of its forward)."""
    return {key: batch[key] for key in INPUT_KEYS if key in batch}


def batch_to_device(batch: dict, device) -> dict:
    """Every array of a batch as a tensor on `device` (a no-op for tensors already there)."""
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


def autocast_context(precision: str, device):
    """bf16 autocast when `precision` is "bf16", or "auto" on CUDA; otherwise full precision."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def window_batches(dataset, batch_size: int) -> Iterable[dict]:
    """A map-style window dataset in order, as batches of tensors (no shuffling, no worker processes)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@dataclass
class WindowPredictions:
    """Predictions and targets of N windows (or replayed frames), de-normalised, with what counts."""

    actions: np.ndarray  # [N, T, K, 3] predicted, m/s and rad/s
    targets: np.ndarray  # [N, T, K, 3] recorded
    weights: np.ndarray  # [N, T, K] action_mask x frame_mask: an entry is scored where > 0
    confidence: np.ndarray | None = None  # [N, T]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # further [N, T, K] masks kept from the batches
    loss_sum: float = 0.0  # policy loss x windows, summed over the batches
    aux_sums: dict[str, float] = field(default_factory=dict)  # each AUX_TERMS x windows, when the loss has them

    @property
    def windows(self) -> int:
        return len(self.actions)

    def scored(self, mask: str | None = None, now_only: bool = False) -> np.ndarray:
        """Bool [N, T, K]: the entries scored, optionally only where `masks[mask]` > 0 and only k = 0."""
        keep = self.weights > 0
        if mask is not None:
            keep &= self.masks[mask] > 0
        if now_only:
            keep[..., 1:] = False
        return keep

    def points(self, mask: str | None = None, now_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(predicted [M, 3], target [M, 3]) of the scored entries (see `scored`)."""
        keep = self.scored(mask, now_only)
        return self.actions[keep], self.targets[keep]

    def metrics(self, mask: str | None = None, now_only: bool = False) -> dict[str, float]:
        """`action_metrics` (MAE, RMSE, R² per axis and overall) of the scored entries; NaN when none."""
        return action_metrics(*self.points(mask, now_only))

    def frame_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """(error [F], confidence [F]) of every frame with a scored entry.

        A frame's error is the mean |action - target| over its scored chunk steps and the 3 axes.
        """
        keep = self.scored()  # [N, T, K]
        per_step = np.abs(self.actions - self.targets).mean(-1) * keep  # [N, T, K]
        counts = keep.sum(-1)  # [N, T]
        frames = counts > 0
        return per_step.sum(-1)[frames] / counts[frames], self.confidence[frames]


def evaluate_windows(
    model,
    batches: Iterable[dict],
    preprocessing,
    *,
    device=None,
    precision: str = "fp32",
    keep_masks: tuple[str, ...] = (),
    loss_weights: dict[str, float] | None = None,
) -> WindowPredictions:
    """Runs `model` over window batches without gradients and collects what `WindowPredictions` scores.

    Args:
        model: a policy (or a DDP/FSDP-wrapped one) already on `device`; its train/eval mode is restored.
        batches: dicts of arrays or tensors in the window-sample layout (`train.windows`).
        preprocessing: de-normalises predictions and targets to m/s and rad/s.
        device: where the batches go (default: where the model's parameters are).
        precision: as `autocast_context`.
        keep_masks: further [B, T, K] batch keys to keep (e.g. "corrected_mask").
        loss_weights: keyword arguments of `policy_loss` for the summed loss (as training's `TrainStep`).

    Returns:
        The de-normalised predictions, targets, weights, confidence, kept masks, summed loss and summed
        auxiliary loss terms (with `aux_weight` > 0 in `loss_weights`).
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("actions", "targets", "weights", "confidence")}
    masks: dict[str, list[np.ndarray]] = {key: [] for key in keep_masks}
    loss_sum, aux_sums = 0.0, {}
    with torch.no_grad(), autocast_context(precision, device):
        for batch in batches:
            batch = batch_to_device(batch, device)
            output = model(model_inputs(batch))
            terms = policy_loss(output, batch, **(loss_weights or {}))
            windows = int(batch["images"].shape[0])
            loss_sum += float(terms["loss"]) * windows
            for key in AUX_TERMS if AUX_TERMS[0] in terms else ():
                aux_sums[key] = aux_sums.get(key, 0.0) + float(terms[key]) * windows
            weights = batch["action_mask"] * batch["frame_mask"].unsqueeze(-1)  # [B, T, K]
            parts["actions"].append(_numpy(output.actions))  # [B, T, K, 3] normalised
            parts["targets"].append(_numpy(batch["actions"]))
            parts["weights"].append(_numpy(weights))
            parts["confidence"].append(_numpy(output.confidence))  # [B, T]
            for key in keep_masks:
                masks[key].append(_numpy(batch[key]))
    model.train(was_training)
    if not parts["actions"]:  # no windows: nothing scored, every metric NaN
        empty = np.zeros((0, 1, 1), np.float32)  # [0, T, K]
        return WindowPredictions(
            actions=np.zeros((0, 1, 1, 3), np.float32),
            targets=np.zeros((0, 1, 1, 3), np.float32),
            weights=empty,
            confidence=np.zeros((0, 1), np.float32),
            masks={key: empty for key in keep_masks},
        )
    joined = {key: np.concatenate(values) for key, values in parts.items()}
    return WindowPredictions(
        actions=preprocessing.denormalise_actions(joined["actions"]),
        targets=preprocessing.denormalise_actions(joined["targets"]),
        weights=joined["weights"],
        confidence=joined["confidence"],
        masks={key: np.concatenate(values) for key, values in masks.items()},
        loss_sum=loss_sum,
        aux_sums=aux_sums,
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
