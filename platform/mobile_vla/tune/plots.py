"""The sweep summary figure logged to the parent run: every trial's curve, and each trial's best value.

Early-stopped trials are dashed (ASHA's decisions at a glance); the best trial is drawn thick.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

STATUS_COLOURS = {"completed": "tab:blue", "early-stopped": "tab:orange", "failed": "tab:red"}


def sweep_summary(trials, metric: str, mode: str, best_trial_id: str | None) -> Figure:
    """trials: TrialSummary list (history per epoch, best, status) -> matplotlib figure.

    Built without pyplot (no backend, no global figure registry): safe in any process.
    """
    fig = Figure(figsize=(12, 4.5))
    curves, bars = fig.subplots(1, 2)
    for trial in trials:
        points = [(h["epoch"], h[metric]) for h in trial.history if h.get("epoch") is not None and metric in h]
        if not points:
            continue
        epochs, values = zip(*points, strict=True)
        best = trial.trial_id == best_trial_id
        curves.plot(
            epochs,
            values,
            "o-" if trial.status == "completed" else "o--",
            color=STATUS_COLOURS.get(trial.status, "grey"),
            lw=2.5 if best else 1.0,
            alpha=1.0 if best else 0.7,
            label=f"{trial.trial_id}{' (best)' if best else ''}",
        )
    curves.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (dashed: stopped early by ASHA)")
    if len(trials) <= 12:
        curves.legend(fontsize=7)

    ranked = [t for t in trials if metric in t.best]
    ranked.sort(key=lambda t: t.best[metric], reverse=mode == "max")
    bars.barh(
        [t.trial_id for t in ranked],
        [t.best[metric] for t in ranked],
        color=[STATUS_COLOURS.get(t.status, "grey") for t in ranked],
    )
    bars.invert_yaxis()
    bars.set(xlabel=f"best {metric}", title="Best value per trial (best first)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in STATUS_COLOURS.values()]
    bars.legend(handles, list(STATUS_COLOURS), fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
