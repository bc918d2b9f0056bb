"""The demo's first two steps: expert data from MiniWorld, then a policy trained on it.

    data = generate_data(cfg)            # <home>/data/miniworld-<episodes>ep-val<pct>-seed<n>, reused if done
    train = train_policy(cfg, data)      # Ray Train V2, MLflow run, registered version @challenger

Both call the stages' own public code in-process: the data is what `mobile-vla data generate`
writes, the training is `mobile-vla train` with jobs/configs/<preset>.yaml plus the demo's overrides.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mobile_vla
from mobile_vla.data.manifest import load_manifest
from mobile_vla.demo.settings import EXPERIMENT, REGISTERED_MODEL, DemoConfig
from mobile_vla.demo.train_progress import EpochProgress
from mobile_vla.errors import ConfigError, ResourceError
from mobile_vla.sim.generate import generate_dataset
from mobile_vla.sim.split_spec import SplitSpec, default_split_spec
from mobile_vla.train.job_config import load_train_config
from mobile_vla.train.trainer import run_training


@dataclass
class DataOutcome:
    """The dataset the demo trains and evaluates on, and how the expert fared generating it."""

    folder: Path
    episodes: int
    frames: int
    expert_kept: int
    expert_attempted: int
    control_hz: float
    reused: bool


@dataclass
class TrainOutcome:
    """The training run and the model version it registered (@challenger)."""

    run_id: str
    run_name: str
    version: str
    epochs: int
    val_mae: float
    val_loss: float
    workers: int


# -- data -------------------------------------------------------------------------------------------
def demo_split_spec(val_fraction: float) -> SplitSpec:
    """Only train and val: every generated episode is either learned from or validated on."""
    defaults = default_split_spec()
    splits = {
        "train": defaults.splits["train"].model_copy(update={"fraction": 1.0 - val_fraction}),
        "val": defaults.splits["val"].model_copy(update={"fraction": val_fraction}),
    }
    return SplitSpec(**{**defaults.model_dump(exclude={"splits"}), "splits": splits})


def generate_data(cfg: DemoConfig) -> DataOutcome:
    """A dataset folder named by its settings; a finished one from an earlier demo is reused."""
    name = f"miniworld-{cfg.episodes}ep-val{round(cfg.val_fraction * 100)}-seed{cfg.data_seed}"
    folder = cfg.resolved_home() / "data" / name
    reused = (folder / "manifest.json").is_file()
    if reused:
        manifest = load_manifest(folder)
    else:
        manifest = generate_dataset(
            folder, cfg.episodes, demo_split_spec(cfg.val_fraction), seed=cfg.data_seed, progress=cfg.progress
        )
    expert = manifest.get("expert_success") or {}
    return DataOutcome(
        folder=folder,
        episodes=int(manifest["counts"]["total"]["episodes"]),
        frames=int(manifest["counts"]["total"]["frames"]),
        expert_kept=sum(int(s["kept"]) for s in expert.values()),
        expert_attempted=sum(int(s["attempted"]) for s in expert.values()),
        control_hz=float(manifest["control_hz"]),
        reused=reused,
    )


# -- train ------------------------------------------------------------------------------------------
def job_config_path(stem: str, what: str) -> Path:
    """jobs/configs/<stem>.yaml of this checkout: the demo runs each job exactly like its command does.

    Raises:
        ConfigError: no such file (the demo runs from a checkout); the message says `what` it is.
    """
    path = Path(mobile_vla.__file__).resolve().parents[2] / "jobs" / "configs" / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found (run the demo from a checkout)")
    return path


def train_policy(cfg: DemoConfig, data: DataOutcome) -> TrainOutcome:
    """Trains the preset on `data` with Ray Train, registers the version as @challenger in MLflow."""
    overrides = [
        f"data.path={data.folder}",
        f"train.epochs={cfg.epochs}",
        f"scaling.num_workers={cfg.train_workers}",
        f"run.name=demo-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        f"run.storage_path={cfg.resolved_home() / 'ray_results'}",
        "mlflow.enabled=true",
        f"mlflow.experiment={EXPERIMENT}",
        f"mlflow.registered_model={REGISTERED_MODEL}",
        "mlflow.alias=challenger",
    ]
    if cfg.max_steps_per_epoch:
        overrides.append(f"train.max_steps_per_epoch={cfg.max_steps_per_epoch}")
    train_cfg = load_train_config(
        job_config_path(cfg.preset, f"train config of preset {cfg.preset!r}"), overrides + list(cfg.train_overrides)
    )
    with EpochProgress(cfg.epochs, cfg.progress) as forward_reports:
        result = run_training(train_cfg, callbacks=[forward_reports], mlflow_tags={"mobile_vla.demo": cfg.preset})
    if not (result.run_id and result.model_version):
        raise ResourceError(f"training run {result.run_name} finished without a registered model version")
    return TrainOutcome(
        run_id=result.run_id,
        run_name=result.run_name,
        version=str(result.model_version),
        epochs=int(result.final_metrics.get("epoch", cfg.epochs)),
        val_mae=float(result.metrics.get("val_mae", math.nan)),
        val_loss=float(result.metrics.get("val_loss", math.nan)),
        workers=train_cfg.scaling.num_workers,
    )
