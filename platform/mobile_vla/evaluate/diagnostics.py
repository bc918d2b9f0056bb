"""Diagnostics of a trained policy on a dataset split: how much does it lean on its state input?

    rows = state_ablation("models:/mobile-vla-policy@challenger", "data/nav", "val")
    [(r["state"], r["mae"]) for r in rows]   # [("recorded", 0.08), ("zeroed", 0.21), ("shuffled", 0.35)]

The state a policy sees is the command executed at the previous step. Expert commands are smooth,
so copying that state alone scores well offline (R² 0.86 / 0.97 / 0.70 per axis on generated data),
and a policy that learned to copy it (a "copycat") repeats its own mistakes in closed loop. The
state ablation scores the now (k = 0) command on the split's windows three times, with the state
input:

- `recorded`: as the data holds it (what training's validation sees);
- `zeroed`: the model's (normalised) state input set to 0, the train split's mean command: the
  same "no state" that `state_dropout` and `state_input = "none"` give;
- `shuffled`: each window gets the recorded state of another window, drawn by a fixed
  permutation: real commands that do not belong to those frames.

A policy that drives from what it sees barely moves between the rows; a copycat's error jumps
when its state is taken away or lies. Windows are W frames from fresh memory, placed with stride W
(every frame scored once, but for the overlap of an episode's last window, which ends on its last
frame), and scored by THE window evaluation
(`train.evaluation.evaluate_windows`): MAE in m/s and rad/s, as training's `val_mae_now`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mobile_vla.errors import ConfigError, ModelError
from mobile_vla.evaluate.tasks import jsonable
from mobile_vla.policy.checkpoint import load_policy
from mobile_vla.tracking import resolve_model
from mobile_vla.train.evaluation import evaluate_windows, window_batches
from mobile_vla.train.windows import WindowDataset

log = logging.getLogger(__name__)

STATE_VARIANTS = ("recorded", "zeroed", "shuffled")
ROW_KEYS = ("mae", "mae_linear_x", "mae_linear_y", "mae_angular_z", "rmse", "r2")


class StateReplaced:
    """A window dataset whose samples carry another state input: zeros, or another window's state."""

    def __init__(self, dataset: WindowDataset, variant: str, seed: int = 0):
        if variant not in STATE_VARIANTS:
            raise ConfigError(f"state variant {variant!r}: expected one of {', '.join(STATE_VARIANTS)}")
        self.dataset = dataset
        self.variant = variant
        self.source = np.random.default_rng(seed).permutation(len(dataset))  # [M] whose state window i gets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, window_id: int) -> dict[str, np.ndarray]:
        sample = self.dataset[window_id]
        if self.variant == "zeroed":
            sample["state"] = np.zeros_like(sample["state"])  # [T, S]
        elif self.variant == "shuffled":
            sample["state"] = self.dataset[int(self.source[window_id])]["state"]  # [T, S] of another window
        return sample


def state_ablation(
    model: str | Path,
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
) -> list[dict]:
    """The now (k = 0) offline error of `model` on `split` with its state recorded, zeroed and shuffled.

    Args:
        model: a models:/ URI or a model folder (the torch policy in its policy/ folder is used).
        data_dir: the dataset folder.
        split: the split whose windows are scored.
        batch_size: windows per forward pass.
        seed: the permutation of the shuffled row.
        device: torch device (default: cuda when available, else cpu).

    Returns:
        One row per variant, in `STATE_VARIANTS` order: {"state", "windows", "frames", "mae",
        "mae_linear_x", "mae_linear_y", "mae_angular_z", "rmse", "r2"} (m/s and rad/s).

    Raises:
        ConfigError: the model takes no state input, or a bad batch size.
        ModelError: the model folder has no saved preprocessing.
        DataError: the split is missing or empty, or its episodes lack the state the model expects.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: expected at least 1")
    resolved = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy, preprocessing = load_policy(resolved.path, device=device)
    if preprocessing is None:
        raise ModelError(f"{resolved.path}: no saved preprocessing: cannot build its windows")
    if preprocessing.state_dim == 0:
        raise ConfigError(f"--state-ablation: {model} takes no state input (S = 0): nothing to ablate")
    dataset = WindowDataset(data_dir, split, preprocessing, augment=False, stride=preprocessing.window)
    rows = []
    for variant in STATE_VARIANTS:
        batches = window_batches(StateReplaced(dataset, variant, seed), batch_size)
        scored = evaluate_windows(policy, batches, preprocessing, device=torch.device(device))
        metrics = scored.metrics(now_only=True)
        frames = int(scored.scored(now_only=True).sum())
        rows.append(
            {"state": variant, "windows": scored.windows, "frames": frames, **{k: metrics[k] for k in ROW_KEYS}}
        )
        log.info("state ablation %s on %s/%s, state %s: mae %.4f", model, data_dir, split, variant, metrics["mae"])
    return rows


def ablation_metrics(split: str, rows: list[dict]) -> dict[str, float]:
    """`diagnostics.<split>.state_<variant>.<name>` for every finite number of the rows (MLflow keys)."""
    return {
        f"diagnostics.{split}.state_{row['state']}.{key}": float(row[key])
        for row in rows
        for key in ROW_KEYS
        if np.isfinite(row[key])
    }


def save_state_ablation(rows: list[dict], out_dir: str | Path, split: str, model: str, data: str) -> Path:
    """Writes `<out_dir>/<split>/state_ablation.json` (NaN as null) and returns its path."""
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "state_ablation.json"
    document = {"split": split, "model": model, "data": data, "rows": jsonable(rows)}
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path
