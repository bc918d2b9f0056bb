"""Evaluation plots: top-down trajectories, confidence on successes vs failures, episode GIFs, and
predicted vs recorded actions (offline). Drawn from the scene specs alone (no GL) on plain
`matplotlib.figure.Figure` objects (no pyplot, no GUI backend, no global state), so they work in any
process and thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle
from PIL import Image

from mobile_vla.policy.config import ACTION_NAMES
from mobile_vla.sim.scenes import AGENT_RADIUS, SceneSpec

OUTCOME_COLOURS = {"success": "tab:green", "wrong_target": "tab:orange", "timeout": "tab:red"}
SHAPE_MARKERS = {"box": "s", "ball": "o", "key": "P"}


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Writes `figure` as a PNG (110 dpi) and returns the path."""
    figure.savefig(path, dpi=110)
    return Path(path)


def _pick_episodes(episodes: list[dict], count: int) -> list[dict]:
    """Successes and failures both shown when there are both: half of each, in seed order."""
    good = [e for e in episodes if e["outcome"] == "success"]
    bad = [e for e in episodes if e["outcome"] != "success"]
    take_bad = min(len(bad), max(count // 2, count - len(good)))
    chosen = bad[:take_bad] + good[: count - take_bad]
    return sorted(chosen, key=lambda e: e["seed"])


def trajectories(report, count: int = 8):
    """Top-down (x, z) view per episode: room, obstacles, distractors, target, the policy's path
    (coloured by outcome) and the expert's path (dashed) on the same scene.
    """
    chosen = _pick_episodes(report.episodes, count)
    columns = min(4, max(len(chosen), 1))
    rows = max(1, math.ceil(len(chosen) / columns))
    figure = Figure(figsize=(3.6 * columns, 3.6 * rows + 0.6), layout="tight")
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, episode in zip(axes.flat, chosen, strict=False):
        scene = SceneSpec.from_json(episode["scene"])
        ax.set_axis_on()
        ax.add_patch(Rectangle((0, 0), scene.room.width, scene.room.depth, fill=False, lw=1.5, color="black"))
        for obstacle in scene.obstacles:
            ax.add_patch(Circle((obstacle.x, obstacle.z), obstacle.radius, color="dimgray", alpha=0.7))
        for item in scene.distractors:
            ax.scatter(
                item.x,
                item.z,
                s=90,
                marker=SHAPE_MARKERS.get(item.kind, "o"),
                color=item.colour,
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
        target = scene.target
        ax.add_patch(Circle((target.x, target.z), target.radius + AGENT_RADIUS, fill=False, ls=":", color="black"))
        ax.scatter(target.x, target.z, s=260, marker="*", color=target.colour, edgecolors="black", zorder=4)
        expert = np.asarray(episode["expert"]["trajectory"], np.float64).reshape(-1, 2)
        ax.plot(expert[:, 0], expert[:, 1], ls="--", lw=1.0, color="black", alpha=0.6, label="expert")
        path = np.asarray(episode["trajectory"], np.float64).reshape(-1, 2)
        colour = OUTCOME_COLOURS.get(episode["outcome"], "tab:blue")
        ax.plot(path[:, 0], path[:, 1], lw=1.8, color=colour, label="policy")
        ax.scatter(path[0, 0], path[0, 1], s=50, marker="^", color="black", zorder=5)
        ax.set_xlim(-0.3, scene.room.width + 0.3)
        ax.set_ylim(scene.room.depth + 0.3, -0.3)  # MiniWorld's top view: z grows downwards
        ax.set_aspect("equal")
        ax.set_title(f"seed {episode['seed']}: {episode['outcome']} ({episode['steps']} steps)", fontsize=8)
        ax.tick_params(labelsize=6)
    if chosen:
        axes.flat[0].legend(fontsize=6, loc="lower left")
    figure.suptitle(
        f"{report.model} on {report.split}: success {report.policy.success_rate:.0%} "
        f"(expert {report.expert.success_rate:.0%}); dashed = expert",
        fontsize=9,
    )
    return figure


def confidence_histogram(episodes: list[dict]):
    """Per-episode mean confidence, successes vs failures: a useful confidence separates them."""
    figure = Figure(figsize=(5.5, 3.5), layout="tight")
    ax = figure.subplots()
    bins = np.linspace(0.0, 1.0, 21)
    for label, keep, colour in (("success", True, "tab:green"), ("failure", False, "tab:red")):
        values = [
            e["mean_confidence"]
            for e in episodes
            if (e["outcome"] == "success") == keep
            and e["mean_confidence"] is not None
            and math.isfinite(e["mean_confidence"])
        ]
        if values:
            ax.hist(values, bins=bins, alpha=0.6, color=colour, label=f"{label} ({len(values)})")
    ax.set_xlabel("mean confidence over the episode")
    ax.set_ylabel("episodes")
    ax.legend(fontsize=8)
    return figure


def write_gif(frames: np.ndarray, path: str | Path, control_hz: float = 5.0, max_frames: int = 60) -> Path:
    """uint8 [N, H, W, 3] camera frames -> an animated GIF at real speed (every n-th frame if long)."""
    every = max(1, math.ceil(len(frames) / max_frames))
    shown = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames[::every]]
    duration_ms = int(round(1000.0 * every / control_hz))
    shown[0].save(path, save_all=True, append_images=shown[1:], duration=duration_ms, loop=0, optimize=True)
    return Path(path)


def actions_over_time(episodes: list[dict], count: int = 3):
    """Recorded vs predicted (executed, k = 0) command per axis over a few episodes (offline)."""
    chosen = episodes[:count]
    figure = Figure(figsize=(11, 2.4 * max(len(chosen), 1)), layout="tight")
    axes = figure.subplots(len(chosen), 3, squeeze=False)
    for row, episode in zip(axes, chosen, strict=True):
        true = np.asarray(episode["true"])  # [T, 3]
        pred = np.asarray(episode["pred"])[:, 0]  # [T, 3]
        for axis, (ax, name) in enumerate(zip(row, ACTION_NAMES, strict=True)):
            ax.plot(true[:, axis], color="black", lw=1.2, label="recorded")
            ax.plot(pred[:, axis], color="tab:blue", lw=1.2, label="predicted")
            ax.set_title(f"{episode['name']}: {name}", fontsize=8)
            ax.tick_params(labelsize=6)
    if chosen:
        axes[0][0].legend(fontsize=7)
    return figure
