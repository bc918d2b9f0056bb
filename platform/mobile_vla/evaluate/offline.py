"""Offline metrics: how closely a model reproduces the recorded commands of a dataset split.

    metrics = evaluate_offline("models:/mobile-vla-policy@challenger", "data/nav", "val")
    metrics["mae"], metrics["r2_linear_x"], metrics["chunk_mae"]

Each episode is replayed as a robot would run it: frame by frame from an empty memory, the LSTM
state carried across the whole episode, the recorded state fed in (the previous command, or the
measured velocity for a `state_input: measured_velocity` model: `train.windows.episode_state`). Headline
metrics (`mae`, `rmse`, `r2` and per axis `mae_linear_x` ...) compare the command the robot would
execute now (`actions[:, 0]`) with the recorded one, in m/s and rad/s (de-normalised); `chunk_*`
compare the whole predicted chunk with the next K recorded commands (where the episode has them).
These are not the training loop's validation numbers, which score W-frame windows from a fresh
memory: this is the deployed behaviour. R² of an axis the data never varies is NaN, not 0 or 1.

Episodes are spread over Ray tasks, each predicting for its episodes in one batch per frame with
the same backend as closed-loop evaluation (ONNX Runtime when the version is exported, else torch).
The dataset folder must be readable by the workers (local runs, or shared storage on a cluster).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobile_vla.data.episodes import FrameReader, read_episode
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import DataError
from mobile_vla.evaluate.closed_loop import log_to_version
from mobile_vla.evaluate.rollout import PolicySpec, worker_backend
from mobile_vla.evaluate.tasks import fan_out, jsonable
from mobile_vla.tracking import resolve_model
from mobile_vla.train.windows import episode_state

log = logging.getLogger(__name__)

PRIMARY_KEYS = ("mae", "rmse", "r2")  # written unqualified too (`offline.mae`: the promotion gate's tripwire)


@dataclass
class OfflineReport:
    """One offline evaluation: what was scored (split, data, model version), its metrics and the replays."""

    split: str
    data: str
    model: str
    model_name: str | None
    model_version: str | None
    run_id: str | None
    metrics: dict[str, float]
    seconds: float
    episodes: list[dict] = field(default_factory=list, repr=False)  # name, pred [T,K,3], true [T,3]

    def version_metrics(self, primary: bool = True) -> dict[str, float]:
        out = {f"offline.{self.split}.{k}": v for k, v in self.metrics.items()}
        if primary:
            out.update({f"offline.{k}": self.metrics[k] for k in PRIMARY_KEYS if k in self.metrics})
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}

    def to_dict(self) -> dict:
        return {
            "split": self.split,
            "data": self.data,
            "model": self.model,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "seconds": round(self.seconds, 2),
            "metrics": jsonable(self.metrics),
            "episodes": [e["name"] for e in self.episodes],
        }


def predict_episodes(paths: list[str], policy: PolicySpec) -> list[dict]:
    """Ray task body: every frame of each episode, episodes batched together frame by frame.
    Frames are read one at a time (original-format episodes hold hundreds of 720p frames).
    """
    backend = worker_backend(policy)
    episodes = [read_episode(path, load_images=False) for path in paths]
    states = [episode_state(e, backend.preprocessing, path) for path, e in zip(paths, episodes, strict=True)]
    for path, state in zip(paths, states, strict=True):  # [T, S] each: the state input the model was trained on
        if state.shape[1] != backend.state_dim:
            raise DataError(f"{path}: state: S = {state.shape[1]}, the model expects {backend.state_dim}")
    reader, size = FrameReader(), backend.image_size
    lengths = [episode.num_frames for episode in episodes]
    preds = [np.zeros((n, backend.signature.chunk, 3), np.float32) for n in lengths]  # [T, K, 3] each
    h, c = backend.initial_memory(len(episodes))  # [layers, E, hidden]
    try:
        for t in range(max(lengths)):
            rows = [e for e, n in enumerate(lengths) if t < n]
            images = np.stack(
                [_prepared(reader.read(paths[e], t, t + 1)[0], backend.preprocessing, size) for e in rows]
            )  # [B, H, W, 3]
            state = np.stack([states[e][t] for e in rows]).astype(np.float32)  # [B, S]
            out = backend.predict(images, state, [episodes[e].instruction for e in rows], (h[:, rows], c[:, rows]))
            h[:, rows], c[:, rows] = out.memory
            for j, e in enumerate(rows):
                preds[e][t] = out.actions[j]
    finally:
        reader.close()
    return [
        {"name": Path(path).name, "pred": pred, "true": episode.actions.astype(np.float32)}
        for path, pred, episode in zip(paths, preds, episodes, strict=True)
    ]


def _prepared(frame: np.ndarray, preprocessing, size: int) -> np.ndarray:
    return frame if frame.shape[:2] == (size, size) else preprocessing.prepare_image(frame)


def replayed_predictions(episodes: list[dict]):
    """Every replayed frame as a one-frame window: its predicted chunk [K, 3] against the next K
    recorded commands, entries past the episode's end unscored. -> `WindowPredictions` [N, 1, K, 3].
    """
    # torch (under train.evaluation) stays out of the Ray workers that import this module for predict_episodes
    from mobile_vla.train.evaluation import WindowPredictions

    actions, targets, weights = [], [], []
    for e in episodes:
        T, K = e["pred"].shape[:2]
        target = np.arange(T)[:, None] + np.arange(K)[None, :]  # [T, K] frame of each chunk entry
        actions.append(e["pred"][:, None])  # [T, 1, K, 3]
        targets.append(e["true"][np.minimum(target, T - 1)][:, None])  # [T, 1, K, 3]
        weights.append((target < T).astype(np.float32)[:, None])  # [T, 1, K]
    return WindowPredictions(np.concatenate(actions), np.concatenate(targets), np.concatenate(weights))


def offline_metrics(episodes: list[dict]) -> dict[str, float]:
    """Now (k = 0) and whole-chunk metrics over all frames of all episodes (see module doc)."""
    scored = replayed_predictions(episodes)
    metrics = scored.metrics(now_only=True)
    chunk = scored.metrics()
    metrics.update({f"chunk_{k}": v for k, v in chunk.items() if k in ("mae", "rmse", "r2")})
    metrics.update(episodes=float(len(episodes)), frames=float(scored.windows))
    return metrics


def offline_report(
    model: str | Path,
    data_dir: str | Path,
    split: str,
    *,
    prefer: tuple[str, ...] = (),
    precision: str = "fp32",
    episodes_per_task: int = 16,
    progress: bool = True,
) -> OfflineReport:
    """Replays every episode of a split through `model` on Ray tasks and scores it (see module doc)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    names = manifest["splits"].get(split)
    if names is None:
        raise DataError(f"{data_dir}: split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    if not names:
        raise DataError(f"{data_dir}: split {split!r} is empty")
    if episodes_per_task < 1:
        raise DataError(f"episodes_per_task = {episodes_per_task}: expected at least 1")
    resolved = resolve_model(model)
    policy = PolicySpec(
        "model", model_path=str(resolved.path), model_uri=str(model), prefer=tuple(prefer), precision=precision
    )

    started = time.time()
    paths = [str((data_dir / name).resolve()) for name in names]
    chunks = [paths[i : i + episodes_per_task] for i in range(0, len(paths), episodes_per_task)]
    episodes = fan_out(predict_episodes, chunks, (policy,), f"offline {split}", progress)
    order = {name: i for i, name in enumerate(names)}
    episodes.sort(key=lambda e: order[e["name"]])
    report = OfflineReport(
        split,
        str(data_dir),
        str(model),
        resolved.name,
        resolved.version,
        resolved.run_id,
        offline_metrics(episodes),
        time.time() - started,
        episodes,
    )
    log.info(
        "offline %s on %s/%s: mae %.4f over %d frames",
        model,
        data_dir,
        split,
        report.metrics["mae"],
        int(report.metrics["frames"]),
    )
    return report


def evaluate_offline(model: str | Path, data_dir: str | Path, split: str, **kwargs) -> dict[str, float]:
    """MAE/RMSE/R² per axis and overall (de-normalised) of `model` on a dataset split; see module doc."""
    return offline_report(model, data_dir, split, **kwargs).metrics


def save_offline(report: OfflineReport, out_dir: str | Path) -> list[Path]:
    """Writes `<out_dir>/<split>/offline.json` and `offline_actions.png`."""
    # matplotlib (under evaluate.plots) stays out of the Ray workers that import this module
    from mobile_vla.evaluate import plots

    folder = Path(out_dir) / report.split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "offline.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    plot = plots.save_figure(plots.actions_over_time(report.episodes), folder / "offline_actions.png")
    return [folder / "offline.json", plot]


def log_offline(report: OfflineReport, files: list[Path], primary: bool = True) -> bool:
    """Logs to the evaluated model version (with `primary`, also the gate's unqualified keys);
    False (and a warning) when there is no version to log to.
    """
    if not (report.model_name and report.model_version):
        log.warning("%s is not a registered model version: results stay in %s", report.model, files[0].parent)
        return False
    tags = {"evaluation.offline.split": report.split, "evaluation.offline.data": report.data}
    log_to_version(
        report.model_name,
        report.model_version,
        report.run_id,
        report.version_metrics(primary),
        files,
        report.split,
        tags,
    )
    return True
