"""`DemoConfig`: how big each step of the demo is, with the two named sizes written out.

    cfg = small(home="./.mobile_vla/demo")                 # `make demo`: <= 20 minutes on 2 CPU cores
    cfg = tiny(home=tmp, episodes=8)                        # CI: the same loop in a few minutes
    cfg = small(dagger_rounds=0)                            # no DAgger round: the robots drive once

Every number a step uses is here, so the summary can say exactly what ran. Validation errors name
the field and the value (`demo: robots = 0: Input should be greater than or equal to 1`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mobile_vla.config import StrictModel, validate_config
from mobile_vla.sim.split_spec import TRAIN_SPLIT
from mobile_vla.tracking.registry import DEFAULT_MODEL_NAME

DEFAULT_HOME = Path(".mobile_vla") / "demo"
REGISTERED_MODEL = DEFAULT_MODEL_NAME
EXPERIMENT = "mobile-vla"
APP_NAME = "mobile-vla-demo"  # the demo's Ray Serve application
EVAL_SPLIT = "val"  # the split evaluation, the speed check and the robots use
DAGGER_SPLIT = TRAIN_SPLIT  # the split whose scenes the robots drive for DAgger labels (they become training data)


class DemoConfig(StrictModel):
    """Every size and switch of one demo run (see the module docstring); presets: `tiny`, `small`."""

    preset: Literal["tiny", "small"] = "small"
    home: Path = Field(default=DEFAULT_HOME, description="platform home: data, MLflow store, Ray results, tokens")

    # data: MiniWorld episodes driven by the scripted expert, split train / val only
    episodes: int = Field(160, ge=4, description="successful expert episodes (train + val)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    data_seed: int = Field(0, ge=0)

    # training: Ray Train V2, DDP over gloo
    epochs: int = Field(6, ge=1)
    train_workers: int = Field(2, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap per epoch (None: every window)")
    train_overrides: list[str] = Field(default_factory=list, description="extra key.sub=value for the train config")

    # evaluation: closed loop on held-back scene seeds of the val split, the expert beside it
    closed_loop_episodes: int = Field(40, ge=1)
    episode_max_steps: int | None = Field(None, ge=1, description="closed-loop step limit (None: the scene's)")

    # promotion: the demo gate (see runner.demo_gate)
    success_floor: float = Field(0.25, ge=0.0, le=1.0, description="closed-loop success a challenger must reach")

    # serving: Ray Serve on 127.0.0.1, robots driving MiniWorld episodes through /v1/act
    robots: int = Field(4, ge=1, le=64)
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 or a busy port: a free one is picked")
    keep_serving: bool = False
    progress: bool = True

    # DAgger through the fleet path (dagger.py): after the robots' drive, the served policy drives
    # DAGGER_SPLIT scenes over HTTP, the expert labels every visited step (/v1/feedback), the online
    # update fine-tunes @champion with replay of the demo's data, gates and promotes; serving follows
    # @champion and the robots drive their scenes again. Round r executes the expert's command with
    # probability dagger_beta ** r.
    dagger_rounds: int = Field(1, ge=0, le=10, description="DAgger rounds after the robots' first drive (0: none)")
    dagger_episodes: int = Field(16, ge=2, description="scenes driven per round (>= 2: one is held out)")
    dagger_beta: float = Field(0.5, ge=0.0, le=1.0, description="probability the expert's command runs in round 1")
    dagger_max_steps: int | None = Field(None, ge=1, description="DAgger episode step limit (None: episode_max_steps)")
    dagger_finetune_steps: int = Field(100, ge=1, description="optimiser steps of the online update per round")
    dagger_batch_size: int = Field(8, ge=1)
    dagger_lr: float = Field(1e-4, gt=0.0)
    update_overrides: list[str] = Field(
        default_factory=list, description="extra key.sub=value for jobs/configs/online_update.yaml"
    )

    @model_validator(mode="after")
    def _enough_data(self) -> DemoConfig:
        val = round(self.episodes * self.val_fraction)
        if val < 1 or self.episodes - val < self.train_workers:
            raise ValueError(
                f"episodes = {self.episodes} with val_fraction = {self.val_fraction}: needs >= 1 val episode and "
                f">= train_workers ({self.train_workers}) train episodes"
            )
        return self

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser().resolve()

    def feedback_dir(self) -> Path:
        """The feedback store the demo's server writes (/v1/feedback) and its online update reads."""
        return self.resolved_home() / "feedback"


def default_home() -> Path:
    """$MOBILE_VLA_HOME when set (the platform's own home), else ./.mobile_vla/demo."""
    env = os.environ.get("MOBILE_VLA_HOME")
    return Path(env) if env else DEFAULT_HOME


def tiny(**overrides) -> DemoConfig:
    """CI: tiny policy, a dozen episodes, two epochs, one DAgger round on 4 short episodes gated on
    forgetting only; exercises every step, learns nothing useful.
    """
    values = dict(
        preset="tiny",
        episodes=12,
        val_fraction=0.25,
        epochs=2,
        train_workers=2,
        max_steps_per_epoch=None,
        train_overrides=[],
        closed_loop_episodes=4,
        episode_max_steps=60,  # the expert needs about 36 steps
        success_floor=0.25,
        robots=2,
        dagger_rounds=1,
        dagger_episodes=4,  # one held out to measure the update on
        dagger_beta=0.5,
        dagger_max_steps=20,
        dagger_finetune_steps=30,
        dagger_batch_size=4,
        dagger_lr=3e-3,
        # The gate of the tiny round is only the shipped forgetting check (replay MAE within 5%): on a
        # few 20-step episodes the corrected-step error of a one-epoch tiny policy did not fall (0.153 ->
        # 0.164 and 0.220 -> 0.230 in two runs, loaded box), so the shipped "5% better where corrected"
        # would reject every CI round. `small` keeps the shipped gate. The summary prints the gate's reason.
        update_overrides=["finetune.trainable=policy_head", "finetune.augment=false", "gate.require_improvement={}"],
    )
    return validate_config({**values, **overrides}, DemoConfig, "demo")


def small(**overrides) -> DemoConfig:
    """`make demo`: the small policy (same classes as full, random init) and one DAgger round, budgeted at
    20 minutes on 2 cores (the round: about 4 of them).
    """
    values = dict(
        preset="small",
        episodes=160,
        val_fraction=0.2,
        epochs=6,
        train_workers=2,
        max_steps_per_epoch=None,
        closed_loop_episodes=40,
        episode_max_steps=None,
        success_floor=0.25,
        robots=4,
        dagger_rounds=1,
        dagger_episodes=16,  # about 700 corrected steps; collected over HTTP in about a minute
        dagger_beta=0.5,
        dagger_max_steps=None,
        dagger_finetune_steps=100,  # batch 8: about 3 passes over the feedback + replay mix, about a minute
        dagger_batch_size=8,
        dagger_lr=1e-4,
        update_overrides=[],
    )
    return validate_config({**values, **overrides}, DemoConfig, "demo")


PRESETS = {"tiny": tiny, "small": small}
