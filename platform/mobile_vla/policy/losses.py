"""Training loss and regression metrics.

Loss = Huber on normalised actions (as RoboVLMs ships: robust to the occasional wild expert or
operator command) + `nll_weight` x Gaussian NLL of the target under N(mean, exp(log_var)).
The NLL sees the mean detached: the Huber term alone fits the actions, the NLL only teaches the
log-variance head how wrong they are (a Gaussian NLL on the mean would down-weight hard samples,
which is the opposite of what a driving policy needs). Both honour `action_mask` [B, T, K] (0 past
the episode end) and `frame_mask` [B, T] (0 for padding frames). Both are weighted means over
(frame, chunk step, axis): `first_step_weight` w counts each k = 0 entry (the command executed now)
w times as much as a later chunk step (w = 1: every step alike).

With `aux_weight` > 0 (a model with `aux_heads`), + aux_weight x the auxiliary loss on the privileged
simulator labels per frame (batch keys `target_bearing`, `target_distance`, `target_in_view`, [B, T]):
MSE of the predicted (sin, cos) of the bearing + Huber of the distance in m, both on the frames where
the target is in view (from one frame, the position of a target out of view is unknowable), + binary
cross-entropy of in view on every frame; all masked by `frame_mask`.

Metrics are on de-normalised actions (m/s, rad/s): the caller de-normalises with its preprocessing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mobile_vla.errors import ConfigError, DataError
from mobile_vla.policy.config import ACTION_NAMES, AUX_LABELS

AUX_TERMS = ("aux", "aux_bearing", "aux_distance", "aux_in_view")  # what policy_loss adds with aux_weight > 0


def policy_loss(
    output,
    batch: dict,
    nll_weight: float = 0.1,
    huber_delta: float = 1.0,
    first_step_weight: float = 1.0,
    aux_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """{"loss", "huber", "nll"} (+ AUX_TERMS with aux_weight > 0): the masked training loss of a batch of
    windows (see the module docstring).

    Raises:
        ConfigError: aux_weight > 0 for a model without auxiliary heads.
        DataError: aux_weight > 0 and the batch lacks a label (AUX_LABELS), named.
    """
    target = torch.as_tensor(batch["actions"]).to(output.actions)  # [B, T, K, 3]
    mask = torch.ones(target.shape[:-1], dtype=target.dtype, device=target.device)  # [B, T, K]
    if batch.get("action_mask") is not None:
        mask = mask * torch.as_tensor(batch["action_mask"]).to(target)
    if batch.get("frame_mask") is not None:
        mask = mask * torch.as_tensor(batch["frame_mask"]).to(target).unsqueeze(-1)
    if first_step_weight != 1.0:
        step_weight = torch.ones(mask.shape[-1], dtype=mask.dtype, device=mask.device)  # [K]
        step_weight[0] = first_step_weight
        mask = mask * step_weight
    weights = mask.unsqueeze(-1).expand_as(target)  # [B, T, K, 3]
    count = weights.sum().clamp(min=1.0)

    huber = (F.huber_loss(output.actions, target, reduction="none", delta=huber_delta) * weights).sum() / count
    error = (target - output.actions.detach()) ** 2
    nll = 0.5 * (output.log_var + error * torch.exp(-output.log_var) + math.log(2.0 * math.pi))
    nll = (nll * weights).sum() / count
    terms = {"loss": huber + nll_weight * nll, "huber": huber, "nll": nll}
    if aux_weight > 0:
        aux = auxiliary_loss(output.aux, batch)
        terms.update(aux)
        terms["loss"] = terms["loss"] + aux_weight * aux["aux"]
    return terms


def auxiliary_loss(aux, batch: dict) -> dict[str, torch.Tensor]:
    """AUX_TERMS: the auxiliary heads' loss on the simulator labels (see the module docstring)."""
    if aux is None:
        raise ConfigError("loss.aux_weight > 0 but the model has no auxiliary heads (PolicyConfig.aux_heads = false)")
    missing = [key for key in AUX_LABELS if batch.get(key) is None]
    if missing:
        raise DataError(
            f"loss.aux_weight > 0 needs the per-frame label(s) {', '.join(missing)} in every window; the data has "
            "none (generate episodes with `mobile-vla data generate`, which records them)"
        )
    bearing, distance, in_view = (torch.as_tensor(batch[key]).to(aux.distance) for key in AUX_LABELS)  # [B, T]
    frames = torch.ones_like(distance)  # [B, T]
    if batch.get("frame_mask") is not None:
        frames = torch.as_tensor(batch["frame_mask"]).to(distance)
    seen = frames * in_view  # [B, T]: frames where the target is in view
    seen_count, frame_count = seen.sum().clamp(min=1.0), frames.sum().clamp(min=1.0)
    target = torch.stack([torch.sin(bearing), torch.cos(bearing)], dim=-1)  # [B, T, 2]
    bearing_loss = (((aux.bearing - target) ** 2).sum(-1) * seen).sum() / seen_count
    distance_loss = (F.huber_loss(aux.distance, distance, reduction="none") * seen).sum() / seen_count
    in_view_loss = (
        F.binary_cross_entropy_with_logits(aux.in_view_logit, in_view, reduction="none") * frames
    ).sum() / frame_count
    return {
        "aux": bearing_loss + distance_loss + in_view_loss,
        "aux_bearing": bearing_loss,
        "aux_distance": distance_loss,
        "aux_in_view": in_view_loss,
    }


def action_metrics(pred, true) -> dict[str, float]:
    """MAE, RMSE, R^2 per axis (`mae_linear_x`, ...) and overall (`mae`, `rmse`, `r2` = mean of axes)."""
    pred = _numpy(pred).reshape(-1, len(ACTION_NAMES))
    true = _numpy(true).reshape(-1, len(ACTION_NAMES))
    if pred.shape != true.shape:
        raise ValueError(f"action_metrics: pred shape {pred.shape} != true shape {true.shape}")
    error = pred - true  # [N, 3]
    metrics: dict[str, float] = {}
    r2_axes = []
    for axis, name in enumerate(ACTION_NAMES):
        e, t = error[:, axis], true[:, axis]
        metrics[f"mae_{name}"] = float(np.abs(e).mean()) if len(e) else math.nan
        metrics[f"rmse_{name}"] = float(np.sqrt((e**2).mean())) if len(e) else math.nan
        total = float(((t - t.mean()) ** 2).sum()) if len(t) else 0.0
        # R^2 is undefined for a constant target (e.g. an axis the robot never uses): NaN, not a fake 0 or 1.
        r2 = 1.0 - float((e**2).sum()) / total if total > 0 else math.nan
        metrics[f"r2_{name}"] = r2
        r2_axes.append(r2)
    metrics["mae"] = float(np.abs(error).mean()) if error.size else math.nan
    metrics["rmse"] = float(np.sqrt((error**2).mean())) if error.size else math.nan
    defined = [r for r in r2_axes if not math.isnan(r)]
    metrics["r2"] = float(np.mean(defined)) if defined else math.nan
    return metrics


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)
