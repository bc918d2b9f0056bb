"""Figures logged to MLflow at the end of a run: training curves and predicted-vs-true actions per axis.

Drawn as plain matplotlib `Figure`s (no pyplot: no display backend, no global figure state to close)
and returned; the caller logs them.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

AXES = ("linear_x", "linear_y", "angular_z")
UNITS = ("m/s", "m/s", "rad/s")


def training_curves(steps: list[dict], epochs: list[dict]):
    """Loss per optimiser step and per epoch (train and validation), validation MAE per axis per epoch.

    steps: [{"step", "loss", "lr"}]; epochs: [{"epoch", "train_loss", "val_loss", "val_mae_<axis>"...}].
    """
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_mae = fig.subplots(1, 2)
    if steps:
        ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="train (step)")
    if epochs:
        # epoch e ends at the step recorded with it: both curves share the step axis
        at = [e["step"] for e in epochs]
        ax_loss.plot(at, [e["train_loss"] for e in epochs], "o-", label="train (epoch mean)")
        ax_loss.plot(at, [e["val_loss"] for e in epochs], "s-", label="validation")
        for axis in AXES:
            key = f"val_mae_{axis}"
            if key in epochs[0]:
                ax_mae.plot([e["epoch"] for e in epochs], [e[key] for e in epochs], "o-", label=axis)
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="Loss")
    ax_mae.set(xlabel="epoch", ylabel="MAE (de-normalised)", title="Validation MAE per axis")
    for ax in (ax_loss, ax_mae):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig


def predicted_vs_true(pred, true, title: str = "Validation: predicted vs true"):
    """One scatter per axis with the identity line; pred and true are [N, 3] de-normalised actions."""
    pred, true = np.asarray(pred), np.asarray(true)
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 3)
    for i, (ax, axis, unit) in enumerate(zip(axes, AXES, UNITS, strict=True)):
        ax.scatter(true[:, i], pred[:, i], s=4, alpha=0.35)
        if len(true):
            lo = float(min(true[:, i].min(), pred[:, i].min()))
            hi = float(max(true[:, i].max(), pred[:, i].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel=f"true {axis} ({unit})", ylabel=f"predicted {axis} ({unit})", title=axis)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (n={len(true)})")
    fig.tight_layout()
    return fig
