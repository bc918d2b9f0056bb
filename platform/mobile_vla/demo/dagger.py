"""The demo's DAgger round, through the path a real fleet uses.

    update_cfg = update_config(cfg, data)            # early: a bad update_overrides fails before training
    dagger = dagger_round(cfg, 1, serving, data, update_cfg)   # collect over HTTP -> update -> serving follows
    dagger.collect.corrections, dagger.update.status, dagger.served_version

1. collect: the served policy (`POST /v1/act` on the demo's server) drives `dagger_episodes` scenes of
   DAGGER_SPLIT (the train split: its scenes become training data) with a beta-mix of expert and
   policy control (`beta = dagger_beta ** round`); the scripted expert labels every visited step,
   and every step goes through `POST /v1/feedback` into the server's feedback store, as an operator
   correction would (`mobile_vla.online.collect.collect` with an endpoint: `mobile-vla collect
   --endpoint URL`);
2. update: `mobile_vla.online.update.run_online_update` with jobs/configs/online_update.yaml and the
   demo's sizes (`mobile-vla online-update`): it fine-tunes @champion on the new feedback with replay
   of the demo's dataset, registers @challenger with ONNX graphs, and promotes it only if its gate
   passes (corrected-step error down, no forgetting on the replay data);
3. swap: on a promotion the server's replicas follow @champion by themselves; the round waits until
   /v1/model says the new version answers (`serving.wait_for_version`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from mobile_vla.demo.serving import Serving, wait_for_version
from mobile_vla.demo.settings import DAGGER_SPLIT, REGISTERED_MODEL, DemoConfig
from mobile_vla.demo.training import DataOutcome, job_config_path
from mobile_vla.online.collect import CollectReport, collect
from mobile_vla.online.update import OnlineUpdateConfig, UpdateReport, load_update_config, run_online_update

REPLAY_EVAL_WINDOWS = 64  # the update's forgetting check on the demo's val windows: seconds, not minutes
PROMOTED = "promoted"


@dataclass
class DaggerOutcome:
    """One round: what the robots collected, what the update decided, and what serving answers with after."""

    round: int
    beta: float
    collect: CollectReport
    update: UpdateReport
    served_version: str | None  # what /v1/model answers with once the round is over
    seconds: dict[str, float] = field(default_factory=dict)  # collect, update, swap


def round_beta(cfg: DemoConfig, round_index: int) -> float:
    """Round r's probability that the expert's command runs: dagger_beta ** r (Ross et al.'s p^(i-1) with
    behaviour cloning as round 0), so later rounds see more of the policy's own mistakes.
    """
    return cfg.dagger_beta**round_index


def update_config(cfg: DemoConfig, data: DataOutcome) -> OnlineUpdateConfig:
    """jobs/configs/online_update.yaml with the demo's model, home, sizes and replay data."""
    overrides = [
        f"model={REGISTERED_MODEL}",
        f"feedback.root={cfg.feedback_dir()}",  # where the demo's server stores /v1/feedback
        f"feedback.min_new_episodes={cfg.dagger_episodes}",  # every episode the robots drove must be there
        f"replay.data={data.folder}",
        f"replay.eval_windows={REPLAY_EVAL_WINDOWS}",
        f"finetune.steps={cfg.dagger_finetune_steps}",
        f"finetune.batch_size={cfg.dagger_batch_size}",
        f"finetune.lr={cfg.dagger_lr}",
        "finetune.device=cpu",
    ]
    path = job_config_path("online_update", "online update config")
    return load_update_config(path, overrides + list(cfg.update_overrides))


def dagger_round(
    cfg: DemoConfig, round_index: int, serving: Serving, data: DataOutcome, update_cfg: OnlineUpdateConfig
) -> DaggerOutcome:
    """Collect over HTTP, update with `update_cfg` (`update_config`), follow the promotion (see the
    module docstring).
    """
    beta = round_beta(cfg, round_index)
    seconds = {}
    started = time.perf_counter()
    collected = collect(
        None,
        cfg.dagger_episodes,
        beta=beta,
        split=DAGGER_SPLIT,
        data=data.folder,
        endpoint=serving.url,
        token=serving.token,
        seed=cfg.data_seed + round_index,
        max_steps=cfg.dagger_max_steps or cfg.episode_max_steps,
        run_tag=f"demo{round_index}-{uuid.uuid4().hex[:6]}",
        progress=cfg.progress,
    )
    seconds["collect"] = time.perf_counter() - started
    started = time.perf_counter()
    update = run_online_update(update_cfg)
    seconds["update"] = time.perf_counter() - started
    started = time.perf_counter()
    if update.status == PROMOTED:
        wait_for_version(serving, update.challenger_version)
    seconds["swap"] = time.perf_counter() - started
    return DaggerOutcome(
        round=round_index,
        beta=beta,
        collect=collected,
        update=update,
        served_version=serving.model_version,
        seconds=seconds,
    )
