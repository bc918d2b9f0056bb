"""The online update job: fleet feedback -> fine-tuned challenger -> gate -> maybe a new champion.

    report = run_online_update(load_update_config("jobs/configs/online_update.yaml"))

Steps, each visible in the job's MLflow run (experiment `mobile-vla-online`):
1. resolve `@champion` (its weights AND its preprocessing: the fine-tune keeps the champion's action
   scaling and tokenizer, so serving's contract does not change under the fleet);
2. assemble feedback episodes not used by an earlier update (the store's watermark), split off a
   held-out part to measure the update on;
3. fine-tune the champion on feedback windows - each target weighted by its step's weight
   (operator corrections and interventions up, uncorrected steps of failed episodes to zero) - mixed
   with a replay sample of the original dataset, so the policy does not forget the scenes nobody
   corrected this week;
4. register the result as `@challenger` (with verified ONNX graphs when the champion has them, so
   serving can load it), evaluate champion and challenger on the same held-out data
   (`online.corrected_mae`, `online.feedback_mae`, `online.replay_mae`) and, if enabled, closed-loop;
5. promote only if the gate passes; the watermark advances when the feedback went into a champion
   (a rejected update leaves its episodes for the next, bigger one). Episodes assembly quarantined
   (an instruction the champion's tokenizer refuses, values beyond float32, a NUL, a frame over the
   pixel budget) are consumed whatever the decision, so one bad record never blocks every update;
   the report lists them. Once the watermark is committed, segments it has passed are deleted
   (`feedback.keep_consumed_s` after their last write).
One update at a time per feedback root (a file lock); a second one is refused, not queued.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import mlflow
import torch
from matplotlib.figure import Figure
from pydantic import Field

from mobile_vla import tracking
from mobile_vla.config import StrictModel, dump_config, flatten, load_config, platform_home
from mobile_vla.data.manifest import load_manifest
from mobile_vla.errors import ConfigError, DataError, ResourceError
from mobile_vla.evaluate.closed_loop import evaluate_closed_loop
from mobile_vla.export.onnx_export import STEP_FP16_FILE
from mobile_vla.export.publish import publish_onnx
from mobile_vla.online.feedback_store import FeedbackStore, FeedbackWeights, feedback_root
from mobile_vla.online.finetune import FinetuneConfig, PlainWindows, WeightedWindows, feedback_metrics, finetune
from mobile_vla.policy.checkpoint import PREPROCESSING_DIR, load_policy, save_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.tracking.job_storage import check_job_storage, configured_place
from mobile_vla.tracking.lifecycle import GateConfig, promote
from mobile_vla.tracking.provenance import provenance_tags
from mobile_vla.tracking.registry import CHALLENGER, CHAMPION, DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)


class FeedbackConfig(StrictModel):
    """Which feedback an update learns from, how it is weighted, and how much is held out to measure it."""

    root: str | None = None  # default $MOBILE_VLA_FEEDBACK_DIR, else $MOBILE_VLA_HOME/feedback (`feedback_root`)
    weights: FeedbackWeights = Field(default_factory=FeedbackWeights)
    stale_after_s: float | None = Field(3600.0, gt=0)  # unfinished episodes older than this are used too
    holdout_fraction: float = Field(0.25, ge=0.0, lt=1.0)  # feedback episodes kept out to measure the update
    min_new_episodes: int = Field(1, ge=1)  # fewer: nothing to learn from, the job ends without a model
    keep_consumed_s: float = Field(0.0, ge=0)  # consumed segments are deleted this long after their last write


class ReplayConfig(StrictModel):
    """The original dataset mixed into the fine-tune (against forgetting) and scored (`online.replay_mae`)."""

    data: str | None = None  # the original dataset folder (manifest.json); null: feedback only
    split: str = "train"
    eval_split: str | None = "val"  # forgetting check (online.replay_mae); null skips it
    ratio: float = Field(1.0, ge=0.0)  # replay windows per feedback window in the fine-tuning mix
    eval_windows: int = Field(64, ge=1)  # cap on replay windows evaluated


class ClosedLoopConfig(StrictModel):
    """Optional closed-loop MiniWorld evaluation of the challenger before the gate."""

    enabled: bool = False  # true once closed-loop evaluation (mobile_vla.evaluate) is deployed on the cluster
    split: str = "unseen_layout"  # a held-out split of the data spec (mobile_vla.sim.split_spec)
    episodes: int = Field(200, ge=1)


class OnlineUpdateConfig(StrictModel):
    """The online update job (`jobs/configs/online_update.yaml`): models, feedback, replay, fine-tune, gate."""

    model: str = DEFAULT_MODEL_NAME  # registered model name
    champion_alias: str = CHAMPION
    challenger_alias: str = CHALLENGER
    experiment: str = "mobile-vla-online"
    workdir: str | None = None  # default $MOBILE_VLA_HOME/online_updates/<time>
    cursor_advance: Literal["on_promotion", "always"] = "on_promotion"
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    closed_loop: ClosedLoopConfig = Field(default_factory=ClosedLoopConfig)
    gate: GateConfig = Field(
        default_factory=lambda: GateConfig(
            require_closed_loop=False,
            offline_mae_metric="online.replay_mae",
            require_improvement={"online.corrected_mae": 0.05},
        )
    )

    def feedback_root(self) -> Path:
        """Where serving's FeedbackStore writes: `feedback.root`, else the platform's one default."""
        return feedback_root(self.feedback.root)


def load_update_config(path: str | Path | None, overrides: list[str] | None = None) -> OnlineUpdateConfig:
    """The job config from a YAML file (None: the defaults) with dotted `key=value` overrides applied."""
    return load_config(path, OnlineUpdateConfig, overrides)


@dataclass
class UpdateReport:
    """What an online update did: the decision, the versions involved, their metrics and the gate's reason."""

    status: Literal["no_new_feedback", "promoted", "rejected", "forced"]
    champion_version: str | None
    challenger_version: str | None = None
    run_id: str | None = None
    feedback_episodes: int = 0
    waiting_episodes: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "champion"/"challenger" -> metrics
    reason: str = ""
    cursor_committed: bool = False
    quarantined: dict[str, str] = field(default_factory=dict)  # episode key -> why assembly refused it
    retired_segments: int = 0

    def summary(self) -> str:
        lines = [
            f"online update: {self.status} (champion v{self.champion_version}, "
            f"challenger v{self.challenger_version or '-'}, {self.feedback_episodes} new feedback episodes, "
            f"{self.waiting_episodes} unfinished)"
        ]
        for role, metrics in self.metrics.items():
            lines.append(f"  {role:>10}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        if self.reason:
            lines.append(f"  gate: {self.reason}")
        if self.quarantined:
            lines.append(f"  quarantined {len(self.quarantined)} episodes (feedback root's quarantine/episodes/):")
            lines += [f"    {key}: {why}" for key, why in sorted(self.quarantined.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- job
class _UpdateLock:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / ".online-update.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ResourceError(f"{self.path}: another online update is running on this feedback root") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _mlflow_run(cfg: OnlineUpdateConfig, champion_version: str) -> str:
    experiment_id = tracking.get_or_create_experiment(cfg.experiment)
    name = f"online-update-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    run = mlflow.MlflowClient().create_run(
        experiment_id, run_name=name, tags={**provenance_tags(), "mobile_vla.parent_version": champion_version}
    )
    return run.info.run_id


def _log_loss_plot(client, run_id: str, losses: list[float]) -> None:
    fig = Figure(figsize=(6, 3.5))  # no pyplot: no backend, no global figure to close
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title("online fine-tuning")
    fig.tight_layout()
    client.log_figure(run_id, fig, "plots/finetune_loss.png")


def _closed_loop(cfg: OnlineUpdateConfig, version: str) -> dict[str, float]:
    """Closed-loop metrics of the challenger from the evaluation stage (MiniWorld episodes on Ray
    tasks), keyed as the gate reads them (`closed_loop.success_rate`, `closed_loop.episodes`, ...).
    The champion's come from its own evaluation, on the same split's fixed scene seeds.
    """
    report = evaluate_closed_loop(
        f"models:/{cfg.model}/{version}",
        cfg.closed_loop.split,
        episodes=cfg.closed_loop.episodes,
        data=cfg.replay.data,
    )
    return report.metrics(primary=True)


def run_online_update(cfg: OnlineUpdateConfig) -> UpdateReport:
    """The whole job; see the module docstring. Raises MobileVLAError subclasses on bad input."""
    default_workdir = str(platform_home() / "online_updates")
    check_job_storage([configured_place("workdir", cfg.workdir, cfg.workdir or default_workdir)])
    tracking.configure_mlflow()
    root = cfg.feedback_root()
    if not (root / "segments").is_dir():
        raise DataError(f"{root}: no feedback segments/ folder (feedback.root; serving writes it)")
    champion_version = tracking.get_version_by_alias(cfg.model, cfg.champion_alias)
    if champion_version is None:
        raise ConfigError(
            f"models:/{cfg.model}@{cfg.champion_alias}: no champion to fine-tune; promote a version first"
        )
    workdir = (
        Path(cfg.workdir)
        if cfg.workdir
        else (platform_home() / "online_updates" / f"{datetime.now(UTC):%Y%m%d-%H%M%S}-v{champion_version}")
    )

    with _UpdateLock(root):
        store = FeedbackStore(root)
        resolved = tracking.resolve_model(f"models:/{cfg.model}/{champion_version}")
        assembled = store.assemble_episodes(
            workdir / "feedback",
            weights=cfg.feedback.weights,
            stale_after_s=cfg.feedback.stale_after_s,
            val_fraction=cfg.feedback.holdout_fraction,
            progress=True,
            check_instruction=_instruction_check(resolved.path),
        )
        report = UpdateReport(
            "no_new_feedback",
            champion_version,
            feedback_episodes=len(assembled.episodes),
            waiting_episodes=len(assembled.waiting),
            quarantined=dict(assembled.summary.quarantined),
        )
        if len(assembled.episodes) < cfg.feedback.min_new_episodes:
            report.reason = f"{len(assembled.episodes)} new finished episodes < feedback.min_new_episodes"
            log.info("online update: %s", report.reason)
            _commit_quarantined(cfg, store, assembled, report)
            return report

        report.run_id = run_id = _mlflow_run(cfg, champion_version)
        try:
            report.challenger_version, report.metrics = _train_register_evaluate(
                cfg, resolved.path, champion_version, workdir, assembled, run_id
            )
        except BaseException:
            mlflow.MlflowClient().set_terminated(run_id, "FAILED")
            raise
        for role, version in (("champion", champion_version), ("challenger", report.challenger_version)):
            tracking.log_version_metrics(cfg.model, version, report.metrics[role])
            tracking.set_version_tags(cfg.model, version, {"online.eval_set": str(workdir / "feedback")})

        decision = promote(cfg.model, version=report.challenger_version, gate=cfg.gate, actor="online-update")
        report.status, report.reason = decision.decision, decision.reason
        if decision.promoted or cfg.cursor_advance == "always":
            store.commit_cursor(
                assembled.cursor,
                {
                    "challenger": report.challenger_version,
                    "decision": decision.decision,
                    "episodes": len(assembled.episodes),
                    "quarantined": sorted(report.quarantined),
                },
            )
            report.cursor_committed = True
            report.retired_segments = len(store.retire(cfg.feedback.keep_consumed_s))
        else:
            _commit_quarantined(cfg, store, assembled, report)
        _finish_run(run_id, report)
        return report


def _instruction_check(champion_dir: Path):
    """The champion tokenizer's check of one instruction (DataError when it has too many tokens), or
    None when the champion has no saved preprocessing.
    """
    folder = champion_dir / "policy" / PREPROCESSING_DIR
    if not folder.is_dir():
        return None
    preprocessing = Preprocessing.load(folder)
    return lambda instruction: preprocessing.tokenize([instruction])


def _commit_quarantined(cfg: OnlineUpdateConfig, store: FeedbackStore, assembled, report: UpdateReport) -> None:
    """Consumes the quarantined episodes alone (the rest waits for an update that uses it), then retires."""
    if assembled.quarantine_cursor is None:
        return
    store.commit_cursor(
        assembled.quarantine_cursor, {"decision": "quarantined_only", "quarantined": sorted(report.quarantined)}
    )
    report.cursor_committed = True
    report.retired_segments = len(store.retire(cfg.feedback.keep_consumed_s))


def _train_register_evaluate(
    cfg: OnlineUpdateConfig, champion_dir: Path, champion_version: str, workdir: Path, assembled, run_id: str
) -> tuple[str, dict[str, dict[str, float]]]:
    client = mlflow.MlflowClient()
    for key, value in flatten(dump_config(cfg)).items():
        client.log_param(run_id, key, str(value)[:6000])
    client.log_metric(run_id, "feedback.episodes", len(assembled.episodes))
    client.log_metric(run_id, "feedback.corrected_steps", assembled.summary.corrected_steps)
    client.log_metric(run_id, "feedback.quarantined_episodes", len(assembled.summary.quarantined))

    model, pre = load_policy(champion_dir / "policy")
    if pre is None:
        raise ConfigError(f"{champion_dir}/policy: the champion has no preprocessing/ (cannot fine-tune it)")
    fb_dir = assembled.out_dir
    splits = load_manifest(fb_dir)["splits"]
    train_fb = WeightedWindows(fb_dir, "train", pre, cfg.finetune.augment, cfg.finetune.seed)
    parts = [train_fb]
    replay_eval = None
    if cfg.replay.data:
        replay_dir = Path(cfg.replay.data).expanduser()
        limit = max(1, int(round(cfg.replay.ratio * len(train_fb)))) if cfg.replay.ratio > 0 else 0
        if limit:
            parts.append(
                PlainWindows(replay_dir, cfg.replay.split, pre, cfg.finetune.augment, cfg.finetune.seed, limit)
            )
        if cfg.replay.eval_split:
            replay_eval = PlainWindows(replay_dir, cfg.replay.eval_split, pre, False, 0, cfg.replay.eval_windows)
    holdout = WeightedWindows(fb_dir, "val", pre, False, 0) if splits.get("val") else None

    def measure(m) -> dict[str, float]:
        metrics = {}
        if holdout is not None:
            metrics.update(
                {f"online.{k}": v for k, v in feedback_metrics(m, holdout, pre, cfg.finetune.device).items()}
            )
        if replay_eval is not None:
            metrics["online.replay_mae"] = feedback_metrics(m, replay_eval, pre, cfg.finetune.device)["feedback_mae"]
        return {k: v for k, v in metrics.items() if not math.isnan(v)}

    before = measure(model)
    log.info(
        "online update: fine-tuning v%s on %d feedback + %d replay windows",
        champion_version,
        len(train_fb),
        sum(len(p) for p in parts[1:]),
    )
    started = time.time()
    losses = finetune(
        model,
        torch.utils.data.ConcatDataset(parts),
        cfg.finetune,
        log_metric=lambda k, v, s: client.log_metric(run_id, k, v, step=s),
    )
    client.log_metric(run_id, "finetune.seconds", time.time() - started)
    _log_loss_plot(client, run_id, losses)
    after = measure(model)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        save_policy(Path(tmp) / "policy", model.cpu(), pre)
        (Path(tmp) / "online_update.json").write_text(
            json.dumps(
                {
                    "parent_version": champion_version,
                    "feedback": str(assembled.out_dir),
                    "episodes": assembled.episodes,
                    "summary": vars(assembled.summary),
                },
                indent=1,
                default=str,
            )
        )
        version = tracking.register_policy(
            tmp,
            run_id,
            name=cfg.model,
            alias=cfg.challenger_alias,
            tags={
                "source": "online-update",
                "online.parent_version": champion_version,
                "online.feedback_episodes": str(len(assembled.episodes)),
            },
            description=f"online update of v{champion_version} on {len(assembled.episodes)} feedback episodes",
            actor="online-update",
        )
    if (champion_dir / "onnx").is_dir():  # serving loads onnx/: the challenger must be servable like its parent
        publish_onnx(
            tracking.resolve_model(f"models:/{cfg.model}/{version}"),
            fp16=(champion_dir / "onnx" / STEP_FP16_FILE).is_file(),
            data_dir=cfg.replay.data,
        )
    if cfg.closed_loop.enabled:
        after.update(_closed_loop(cfg, version))
    for key, value in after.items():
        client.log_metric(run_id, f"challenger.{key}", value)
    for key, value in before.items():
        client.log_metric(run_id, f"champion.{key}", value)
    client.log_metric(run_id, "finetune.final_loss", losses[-1])
    return version, {"champion": before, "challenger": after}


def _finish_run(run_id: str, report: UpdateReport) -> None:
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "online.decision", report.status)
    client.set_tag(run_id, "online.reason", report.reason[:4900])
    client.set_terminated(run_id, "FINISHED")
