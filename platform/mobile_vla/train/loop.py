"""`train_loop_per_worker(config)`: what every Ray Train worker runs.

One epoch = one pass over this worker's shard of the training windows (Ray Data streams each worker an
equal share, so every rank takes the same number of steps and DDP's all-reduce never waits on a rank that
ran out), then validation on the held-out split, then one `ray.train.report` per epoch on every rank
(it is a barrier) with a checkpoint from rank 0. Side effects (MLflow, checkpoint files, printing) happen
on rank 0 only. The step itself (forward, loss, backward, clip, optimiser) is `train.step.TrainStep`,
the same one the online update fine-tunes with; validation is `train.evaluation.evaluate_windows`.

config keys (built by `trainer.loop_config`): job (TrainJobConfig as a dict), preprocessing (packed
folder), steps_per_epoch (optimiser steps), run_id + tracking_uri (MLflow, or None).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from mobile_vla.policy.checkpoint import load_policy
from mobile_vla.policy.losses import AUX_TERMS, action_metrics
from mobile_vla.policy.model import build_policy
from mobile_vla.policy.preprocessing import Preprocessing
from mobile_vla.train import checkpointing
from mobile_vla.train.distributed import (
    full_model_state,
    full_optimizer_state,
    gather_to_all,
    is_sharded,
    load_full_state,
    sum_across_ranks,
    unwrap,
    wrap_model,
)
from mobile_vla.train.evaluation import evaluate_windows
from mobile_vla.train.job_config import TrainJobConfig
from mobile_vla.train.preflight import resolve_policy_config
from mobile_vla.train.progress import StepUpdate, publish
from mobile_vla.train.step import TrainStep, param_groups, warmup_cosine

VAL_SAMPLE_POINTS = 3000  # predicted-vs-true points kept per epoch for the plot
METRICS_PER_FLUSH = 200  # buffered MLflow metrics sent in one round trip


def with_last_flag(iterable, waited: list[float] | None = None):
    """Yields (item, is_last) so the final partial accumulation group still steps the optimiser.

    `waited[0]` accumulates the seconds spent blocked on the iterator: time the model sat idle waiting
    for data, which says whether the input pipeline is the bottleneck.
    """
    iterator = iter(iterable)

    def pull():
        started = time.perf_counter()
        try:
            return next(iterator)
        finally:
            if waited is not None:
                waited[0] += time.perf_counter() - started

    try:
        current = pull()
    except StopIteration:
        return
    while True:
        try:
            upcoming = pull()
        except StopIteration:
            yield current, True
            return
        yield current, False
        current = upcoming


class RankZeroTracker:
    """Buffers metrics and sends them to the run in batches (one SQLite/HTTP round trip per flush)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = run_id
        self.pending: list = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self.pending) >= METRICS_PER_FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def validate(model, shard, preprocessing, cfg: TrainJobConfig, device) -> tuple[dict, tuple]:
    """Loss and MAE/RMSE/R² per axis on de-normalised actions over the whole validation split.

    Every rank scores its shard; the loss sums and the scored points are combined over all ranks.
    Returns the metrics (`val_loss` with the run's loss weights, `val_mae`, ..., `val_mae_now`: the
    MAE of the executed k = 0 commands, and with loss.aux_weight > 0 the auxiliary terms `val_aux`,
    `val_aux_bearing`, ...) and a sample (pred [N, 3], true [N, 3]) for the plot.
    """
    batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, device=device)
    scored = evaluate_windows(
        model, batches, preprocessing, device=device, precision=cfg.train.precision, loss_weights=cfg.loss.weights()
    )
    aux_keys = AUX_TERMS if cfg.loss.aux_labels else ()
    sums = sum_across_ranks(
        [scored.loss_sum, float(scored.windows)] + [scored.aux_sums.get(k, 0.0) for k in aux_keys], device
    )
    loss_sum, count = sums[0], sums[1]
    pred, true = (gather_to_all(points) for points in scored.points())
    now_pred, now_true = (gather_to_all(points) for points in scored.points(now_only=True))
    metrics = {"val_loss": loss_sum / max(count, 1.0)}
    metrics.update({f"val_{k}": float(v) for k, v in action_metrics(pred, true).items()})
    metrics["val_mae_now"] = action_metrics(now_pred, now_true)["mae"]
    metrics.update({f"val_{key}": total / max(count, 1.0) for key, total in zip(aux_keys, sums[2:], strict=True)})
    pick = np.random.default_rng(0).permutation(len(pred))[:VAL_SAMPLE_POINTS]
    return metrics, (pred[pick], true[pick])


@dataclass
class WorkerRun:
    """What one worker holds across epochs."""

    cfg: TrainJobConfig
    job: dict  # the job config as the driver sent it (written into each checkpoint)
    rank: int
    device: torch.device
    preprocessing: Preprocessing
    policy_config: object
    model: torch.nn.Module  # wrapped for DDP/FSDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: checkpointing.Progress
    tracker: RankZeroTracker | None = None
    progress_queue: object | None = None  # rank 0 only: the driver's terminal progress (train.progress)
    total_steps: int = 0  # optimiser steps of the whole run (steps_per_epoch x epochs)
    resumed_from_epoch: int = 0  # 0 for a fresh start; > 0 after a resume or a worker restart


@dataclass
class EpochStats:
    """This rank's training-side counts of one epoch."""

    loss_sum: float = 0.0  # over micro-batches
    aux_sums: dict[str, float] = field(default_factory=dict)  # each auxiliary loss term, over micro-batches
    batches: int = 0
    samples: int = 0
    waited_s: float = 0.0  # blocked on the data iterator


def _write_pid(pid_dir: str | None, rank: int) -> None:
    """Fault-injection hook: a test (or an operator) can find and kill a worker by its pid file."""
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        target = Path(pid_dir) / f"rank{rank}.pid"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(target)


def _set_up(config: dict) -> WorkerRun:
    """Config, rank, preprocessing, the wrapped model (same initial weights on every rank), optimiser, LR."""
    cfg = TrainJobConfig.model_validate(config["job"])
    rank = ray.train.get_context().get_world_rank()
    _write_pid(cfg.run.pid_dir, rank)
    device = ray.train.torch.get_device()
    workdir = Path(tempfile.mkdtemp(prefix="mobile-vla-worker-"))
    preprocessing = Preprocessing.load(checkpointing.unpack_folder(config["preprocessing"], workdir / "prep"))

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    np.random.seed(cfg.train.seed + rank)
    policy_config = resolve_policy_config(cfg)
    model = wrap_model(build_policy(policy_config), cfg.train.strategy, device)
    optimizer = torch.optim.AdamW(
        param_groups(unwrap(model), cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        fused=device.type == "cuda",
    )
    total_steps = int(config["steps_per_epoch"]) * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio)
    )
    tracker = RankZeroTracker(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    return WorkerRun(
        cfg=cfg,
        job=config["job"],
        rank=rank,
        device=device,
        preprocessing=preprocessing,
        policy_config=policy_config,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=checkpointing.Progress(),
        tracker=tracker,
        progress_queue=config.get("progress_queue") if rank == 0 else None,
        total_steps=total_steps,
    )


def _resume(run: WorkerRun) -> None:
    """Loads weights, optimiser, scheduler and progress from Ray Train's latest checkpoint, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        restored, _ = load_policy(Path(folder) / checkpointing.POLICY_DIR)
        state, run.progress = checkpointing.read_train_state(folder)
    load_full_state(run.model, run.optimizer, restored.state_dict(), state["optimizer"], run.cfg.train.strategy)
    run.scheduler.load_state_dict(state["scheduler"])
    run.resumed_from_epoch = run.progress.epoch
    if run.rank == 0:
        print(f"[mobile-vla] resuming at epoch {run.progress.epoch} step {run.progress.step} from {checkpoint.path}")


def _train_epoch(run: WorkerRun, step: TrainStep, shard, epoch: int) -> EpochStats:
    """One pass over this rank's shard; logs the mean loss of a step group every log_every_n_steps."""
    cfg, progress = run.cfg, run.progress
    stats, window_loss, waited = EpochStats(), 0.0, [0.0]
    batches = shard.iter_torch_batches(
        batch_size=cfg.train.batch_size,
        device=run.device,
        prefetch_batches=2,
        local_shuffle_buffer_size=max(2 * cfg.train.batch_size, 32),
        local_shuffle_seed=cfg.train.seed + epoch,
    )
    for batch, is_last in with_last_flag(batches, waited):
        result = step(batch, last=is_last)
        stats.loss_sum += result.loss
        for key, value in (result.aux or {}).items():
            stats.aux_sums[key] = stats.aux_sums.get(key, 0.0) + value
        stats.batches += 1
        stats.samples += int(batch["images"].shape[0])
        window_loss += result.loss
        if not result.stepped:
            continue
        progress.step += 1
        if progress.step % cfg.train.log_every_n_steps == 0 or is_last:
            point = {
                "step": progress.step,
                "loss": window_loss / result.group_size,
                "lr": run.scheduler.get_last_lr()[0],
            }
            progress.steps.append(point)
            if run.tracker:
                run.tracker.log({"train_loss_step": point["loss"], "lr": point["lr"]}, progress.step)
            update = StepUpdate(epoch + 1, cfg.train.epochs, progress.step, run.total_steps, point["loss"])
            publish(run.progress_queue, update)
        window_loss = 0.0
    stats.waited_s = waited[0]
    return stats


def _report_epoch(run: WorkerRun, metrics: dict, val_sample: tuple) -> None:
    """Checkpoint (written by rank 0, full weights gathered first under FSDP) and `ray.train.report`."""
    strategy = run.cfg.train.strategy
    sharded = is_sharded(strategy)
    model_state = full_model_state(run.model, strategy) if sharded else None  # a collective under FSDP
    optimizer_state = full_optimizer_state(run.model, run.optimizer, strategy)
    with tempfile.TemporaryDirectory(prefix="mobile-vla-ckpt-") as tmp:
        report_checkpoint = None
        if run.rank == 0:
            shipped = unwrap(run.model)
            if sharded:  # rank 0 holds the gathered weights; save them through an unsharded twin
                shipped = build_policy(run.policy_config, load_pretrained=False)
                shipped.load_state_dict(model_state)
            checkpointing.write_checkpoint(
                tmp,
                model=shipped,
                preprocessing=run.preprocessing,
                optimizer_state=optimizer_state,
                scheduler_state=run.scheduler.state_dict(),
                progress=run.progress,
                job_config=run.job,
                metrics=metrics,
                val_sample=val_sample,
            )
            report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            _log_epoch(run, metrics)
        ray.train.report(
            metrics, checkpoint=report_checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{run.progress.epoch:04d}"
        )


def _log_epoch(run: WorkerRun, metrics: dict) -> None:
    """Rank 0: the epoch's metrics to MLflow and one progress line."""
    if run.tracker:
        run.tracker.log({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, run.progress.epoch)
        run.tracker.flush()
    print(
        f"[mobile-vla] epoch {run.progress.epoch}/{run.cfg.train.epochs} step {run.progress.step} "
        f"train_loss {metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f} "
        f"val_mae {metrics.get('val_mae', float('nan')):.4f} "
        f"val_mae_now {metrics.get('val_mae_now', float('nan')):.4f} "
        f"{metrics['samples_per_s']:.1f} samples/s"
    )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's worker function: set up, resume if a checkpoint exists, then train, validate, report."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # ---- setup and resume ----
    run = _set_up(config)
    _resume(run)
    cfg = run.cfg
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    step = TrainStep(
        run.model,
        run.optimizer,
        device=run.device,
        scheduler=run.scheduler,
        grad_clip=cfg.optim.grad_clip,
        accumulate=cfg.optim.accumulate,
        precision=cfg.train.precision,
        strategy=cfg.train.strategy,
        loss_weights=cfg.loss.weights(),
    )
    run.model.train()

    for epoch in range(run.progress.epoch, cfg.train.epochs):
        # ---- train ----
        started = time.perf_counter()
        stats = _train_epoch(run, step, train_shard, epoch)
        seconds = time.perf_counter() - started
        aux_keys = AUX_TERMS if cfg.loss.aux_labels else ()
        train_loss = sum_across_ranks(
            [stats.loss_sum, float(stats.batches)] + [stats.aux_sums.get(k, 0.0) for k in aux_keys], run.device
        )
        global_samples = sum_across_ranks([float(stats.samples)], run.device)[0]
        # ---- validate ----
        metrics, val_sample = validate(run.model, val_shard, run.preprocessing, cfg, run.device)
        run.progress.epoch = epoch + 1
        metrics.update(
            {
                "epoch": run.progress.epoch,
                "step": run.progress.step,
                "train_loss": train_loss[0] / max(train_loss[1], 1.0),
                "samples_per_s": global_samples / max(seconds, 1e-9),
                "epoch_seconds": seconds,
                "resumed_from_epoch": run.resumed_from_epoch,
                "data_wait_fraction": stats.waited_s / max(seconds, 1e-9),  # rank 0's share spent waiting
            }
        )
        batches = max(train_loss[1], 1.0)  # the auxiliary terms (train_aux, ...), means as train_loss
        metrics.update({f"train_{key}": total / batches for key, total in zip(aux_keys, train_loss[2:], strict=True)})
        run.progress.epochs.append(dict(metrics))
        # ---- checkpoint and report (a barrier on every rank) ----
        _report_epoch(run, metrics, val_sample)
